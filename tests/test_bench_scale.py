"""bench.scale in a tiny configuration: the real server and 2 real native nodes, llama tiny,
2 rounds, streamed uploads (chunks small enough that every update streams), sparse downlink."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.scale import stream_rate

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"model", "params", "nodes", "rounds", "model_mb", "server_peak_rss_mb",
        "node_peak_rss_mb", "stream_MBps", "down_over_up", "eval_loss_start", "eval_loss_end",
        "wall_s"}


@pytest.mark.timeout(120)
def test_tiny_scale_bench_trains_streams_and_reports_sane_figures() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.scale", "--flavour", "tiny",
                           "--nodes", "2", "--rounds", "2", "--chunk-mb", "0.002",
                           "--no-stagger", "--timeout", "100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("committed: eval loss") == 2  # a progress line per round
    f = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(f) >= KEYS
    assert f["model"] == "llama-tiny"
    assert (f["nodes"], f["rounds"]) == (2, 2)
    assert 50_000 < f["params"] < 200_000
    assert f["model_mb"] == pytest.approx(f["params"] * 4 / 1e6, abs=0.05)
    assert f["eval_loss_end"] < f["eval_loss_start"]  # the loss falls
    # processes that imported torch: tens of MB at least, and not gigabytes for 0.1M params
    assert 100 < f["server_peak_rss_mb"] < 2000
    assert 100 < f["node_peak_rss_mb"] < 2000
    assert f["node_exit_codes"] == [0, 0]
    assert f["streamed_updates"] == 4  # every update of both rounds streamed
    assert f["stream_MBps"] is not None
    assert f["stream_MBps"] > 0
    # the sparse downlink: after the join a node downloads about what it uploads
    assert 0 < f["down_over_up"] <= 2
    assert f["down_over_up_with_join"] > f["down_over_up"]  # round 0 carries full params
    assert all(r["n_updates"] == 2 for r in f["per_round"])
    assert f["wall_s"] < 100


def test_stream_rate_reads_the_servers_log_lines() -> None:
    log = "\n".join([
        "2026-12-06 03:00:00,000 INFO server.streams: streamed update from ab for round 0: "
        "4000000 bytes in 4 chunks",
        "2026-12-06 03:00:01,000 INFO server.streams: streamed update from cd for round 0: "
        "4000000 bytes in 4 chunks",
        "2026-12-06 03:00:02,000 INFO server.streams: streamed update from ab for round 0 "
        "complete (accepted)",
        "2026-12-06 03:00:04,000 INFO server.streams: streamed update from cd for round 0 "
        "complete (accepted)",
        "2026-12-06 03:00:09,000 INFO server.streams: streamed update from ab for round 1: "
        "1000 bytes in 1 chunks",  # never completed: not counted
    ])
    r = stream_rate(log)
    assert r["streamed_updates"] == 2
    assert r["streamed_bytes"] == 8_000_000
    assert r["stream_s"] == pytest.approx(2.0 + 3.0)  # each update from its start to its end
    assert r["stream_MBps"] == pytest.approx(1.6)


@pytest.mark.timeout(120)
def test_tiny_scale_server_bench_measures_each_commit_stage() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.scale_server", "--flavour", "tiny"],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    f = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f["bench"] == "scale_server"
    assert [s["stage"] for s in f["stages"]] == ["imports", "open_run", "aggregate",
                                                 "outer_step", "evaluate", "commit"]
    assert all(s["peak_mb"] >= s["rss_mb"] > 50 for s in f["stages"])
    assert f["server_peak_rss_mb"] == max(s["peak_mb"] for s in f["stages"])
    assert f["eval_loss_after"] is not None
