"""bench.hierarchy in a tiny configuration: the same code paths (real coordinator, real
participants, the native p2p role with its GroupRole over in-process links), both modes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_flat_vs_hierarchical() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.hierarchy", "--nodes", "9", "--groups",
                           "3", "--rounds", "3", "--inner-steps", "3", "--flavour", "default",
                           "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fig["nodes"] == 9
    assert fig["groups"] == 3
    flat, hier = fig["flat"], fig["hierarchical"]
    for side in (flat, hier):
        assert side["node_errors"] == 0
        assert side["server_bytes_per_round"] > 0
        assert side["final_loss"] is not None
        assert side["server_cpu_s_per_round"] > 0
        assert side["server_cpu_s_by_message"]["reduce"] > 0
    # flat: every update in, params out; hierarchical: group results, no Submit at all
    assert "Submit" in flat["bytes_by_message"]
    assert "Submit" not in hier["bytes_by_message"]
    assert hier["bytes_by_message"]["Shard"] > 0
    assert hier["server_bytes_per_round"] < flat["server_bytes_per_round"]
    assert abs(fig["loss_gap"]) < 0.05  # a weighted mean of group medians vs the median
