"""bench.overlap --quick: the real server and 2 native nodes behind a 100 ms link, overlap off
and on: both train, every round after the first runs ahead with the option (and none
without), and overlapping the upload with the next round's steps raises the nodes' compute
utilization."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_quick_overlap_trains_and_raises_utilization() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.overlap", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert any("overlap on" in line for line in lines[:-1])  # the table
    fig = json.loads(lines[-1])
    assert fig["delays_s"] == [0.1]
    runs = {r["overlap"]: r for r in fig["runs"]}
    assert runs[False]["rounds_run_ahead"] == [0, 0]
    assert runs[True]["rounds_run_ahead"] == [3, 3]  # every round after the first, each node
    for r in runs.values():
        assert r["rounds"] == 4
        assert r["final_eval_loss"] < 0.5 * r["eval_loss_init"]  # it trains, in both modes
        assert 0 < r["utilization"] <= 1.05  # compute time is wall time of the steps
    # the size of the gain is the bench's figure (bench/results/overlap.txt), not this test's:
    # 4 short rounds on a shared machine gave +0.08 to +0.4; its direction is the behaviour
    got = fig["by_delay"]["0.1"]
    assert got["utilization_on"] > got["utilization_off"]
