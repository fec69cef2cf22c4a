"""server.spool_geomed: the geometric median of spooled updates keeps its model-size float64
vectors in scratch files (gone afterwards), so its own allocations are blocks and the float32
result, on the Gram path and on the explicit fallback; the answer is the in-memory rule's."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from server.spool import Spool
from server.spool_rules import aggregate
from shared.aggregation import get_rule

D = 300_000  # 1.2 MB float32, 2.4 MB float64


def _spool(folder: Path, vectors: list[np.ndarray]) -> list[np.ndarray]:
    spool = Spool(folder)
    return [spool.store_vector(f"{i:064x}", 3, v) for i, v in enumerate(vectors)]


def _rounds() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(9)
    spread = [rng.standard_normal(D).astype(np.float32) for _ in range(12)]
    same = rng.standard_normal(D).astype(np.float32)  # most equal: explicit Weiszfeld steps
    explicit = [same.copy() for _ in range(9)] + [
        same + rng.standard_normal(D).astype(np.float32) for _ in range(3)]
    return {"gram": spread, "explicit": explicit}


@pytest.mark.parametrize("path", ["gram", "explicit"])
def test_memory_is_blocks_and_the_result_and_the_scratch_files_go(tmp_path: Path,
                                                                  path: str) -> None:
    vectors = _rounds()[path]
    want = get_rule("geometric-median")(vectors)
    maps = _spool(tmp_path / "spool", vectors)
    del vectors
    tracemalloc.start()
    try:
        got = aggregate("geometric-median", maps, f=0, chunk=64 * 2**10 // 12)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, want)
    result_mb = 4 * D / 2**20
    # the stack's float64 blocks (~4 MiB, as every rule) + the float32 result: 6.7 MB here;
    # the median and the point as float64 vectors in memory (before spool_geomed): 8.8 MB
    assert peak < 4.5 + result_mb + 2.0, peak
    assert sorted(p.suffix for p in (tmp_path / "spool").iterdir()) == [".f32"] * 12
