"""ml.memory.trim: freed heap blocks go back to the OS (glibc), which glibc alone keeps."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ml import memory

pytestmark = pytest.mark.skipif(memory._malloc_trim() is None,
                                reason="no glibc malloc_trim on this platform")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_trim_returns_freed_multi_mb_blocks_that_glibc_keeps() -> None:
    big = np.ones(4 << 20, dtype=np.float32)  # 16 MiB, mmapped; freeing it raises glibc's
    del big  # mmap threshold to 16 MiB, so the 4 MiB blocks below come from the heap
    blocks, pins = [], []
    for _ in range(64):  # 256 MiB, touched; each followed by a small live block, so the freed
        blocks.append(np.ones(1 << 20, dtype=np.float32))  # ones cannot merge into the top
        pins.append(np.ones(1024, dtype=np.float32))  # of the heap (as torch's never do)
    held = rss_mb()
    del blocks
    kept = rss_mb()
    assert memory.trim() is True
    after = rss_mb()
    assert held - kept < 0.5 * (held - after), (held, kept, after)  # free alone kept most
    assert kept - after > 128, (held, kept, after)  # trim handed back most of 256 MiB
    assert len(pins) == 64


def test_trim_is_harmless_to_live_data() -> None:
    x = np.arange(1 << 20, dtype=np.float32)
    memory.trim()
    assert float(x.sum()) == float(np.arange(1 << 20, dtype=np.float64).sum())
    assert sys.platform.startswith("linux")
