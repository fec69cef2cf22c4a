"""Real data channels inside a private network namespace the test creates: aiortc <-> aiortc
(in one process and across two), and, where Chromium is installed, Chromium -> aiortc and
Chromium <-> Chromium (two pages): a chunked frame arrives whole and digest-verified at the
receiver (bench.transport asserts it); a cancelled transfer is dropped."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.common import ROOT
from bench.netns import available


@pytest.mark.skipif(available() is not None, reason=f"no private network namespace: "
                                                    f"{available()}")
def test_frames_over_a_real_data_channel() -> None:
    out = subprocess.run([sys.executable, "-m", "bench.transport", "--peers", "--mb", "3",
                          "--repeats", "1", "--check-cancel"], cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["MBps"]["aiortc-aiortc"] > 0  # two processes
    assert figures["MBps"]["aiortc-aiortc-1process"] > 0
    assert "channel still usable" in out.stderr
    if os.path.exists(os.environ.get("DAA_CHROMIUM", "/usr/bin/chromium")):
        assert figures["MBps"]["aiortc-chromium"] > 0  # a tab's frame into aiortc
        assert figures["MBps"]["chromium-chromium"] > 0  # browser <-> browser
