"""bench.tab_overlap in its tiny configuration: a real server and one Chromium tab per mode
(overlap off, on), SparseLoCo, 2 rounds of 2 steps. The figures are measured (utilization in
(0, 1], round times) and the overlapped tab merged the steps it ran ahead into round 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.tab_overlap import CHROMIUM

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(420)
def test_bench_tab_overlap_tiny() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM}")
    proc = subprocess.run([sys.executable, "-m", "bench.tab_overlap", "--rounds", "2",
                           "--inner-steps", "2", "--timeout-s", "240"],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    fig = json.loads(proc.stdout.strip().splitlines()[-1])
    off, on = fig["rows"]
    for row in (off, on):
        assert (row["rounds"], row["accepted"], row["resyncs"]) == (2, 2, 0), row
        assert 0 < row["utilization"] <= 1, row
        assert row["round_s"] > 0, row
        assert row["sparse_opens"] == 1, row  # round 1's RoundOpen: the sparse step
        assert row["console_errors"] == [], row
    assert (off["steps_ahead"], off["merged_rounds"]) == (0, 0)
    assert on["merged_rounds"] == 1
    assert on["steps_ahead"] >= 2  # after rounds 0 and 1 (the last is never merged)
    assert fig["merged_rounds_on"] == 1
