"""bench.load in a tiny configuration: real server, real WebSockets, real signatures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.load import summarize

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_tiny_load_run_commits_every_round_with_nothing_dropped() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.load", "--participants", "20",
                           "--rounds", "2", "--workers", "2", "--spread-s", "1",
                           "--timeout-s", "200"], cwd=ROOT, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fig["participants"] == 20
    assert fig["rounds"] == 2  # measured rounds, after the join
    assert fig["committed_rounds"] == 3
    assert fig["finished"] is True
    assert fig["dropped_messages"] == 0
    assert fig["errors"] == 0
    assert len(fig["server_commit_ms"]) == 3  # one per commit, the join's included
    assert 0 < fig["p99_commit_ms"] <= max(fig["server_commit_ms"][1:]) < 60_000
    assert fig["p99_submit_to_commit_ms"] > 0
    assert fig["server_peak_rss_mb"] > 50


def _member(acked: dict[str, float], committed: dict[str, float], **kw: object
            ) -> dict[str, Any]:
    return {"submitted": {k: v - 0.5 for k, v in acked.items()}, "acked": acked,
            "committed": committed, "errors": [], "closed": 0, "connect_failures": [],
            "closes": [], **kw}


def test_summary_measures_from_the_last_submit_and_counts_what_went_missing() -> None:
    # round 1: the last Submit left at t=9.5; commits reach the two members at 10.2 and
    # 10.4 s; the second member never got round 2's Ack
    a = _member({"0": 1.0, "1": 9.0, "2": 20.0}, {"0": 2.0, "1": 10.2, "2": 21.0})
    b = _member({"0": 1.5, "1": 10.0}, {"0": 2.0, "1": 10.4, "2": 21.0},
                closed=1, closes=["CLOSE 1006"], connect_failures=["timeout"])
    b["submitted"]["2"] = 19.0
    figs, rows = summarize([{"members": [a, b], "exceptions": []}], 2)
    assert figs["rounds"] == 2
    # round 1: 700 and 900 ms after the last Submit; round 2 (last Submit 19.5): 1500 ms
    assert figs["p99_submit_to_commit_ms"] == pytest.approx(1500, abs=1)
    assert [r["submit_to_commit_max_ms"] for r in rows] == [1000, 900, 1500]
    # b's unacknowledged Submit, its close and its failed connect
    assert figs["dropped_messages"] == 3
    assert figs["errors"] == 0
    assert [r["round"] for r in rows] == [0, 1, 2]
