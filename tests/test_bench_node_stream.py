"""bench.node_stream in a tiny configuration: llama tiny, one real native node, one round per
run, int8-block, the one-shot and the chunked path each through the real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(150)
def test_tiny_node_stream_bench_runs_both_paths_and_reports_peaks() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.node_stream", "--flavour", "tiny",
                           "--rounds", "1", "--codecs", "int8", "--chunk-mb", "0.01",
                           "--timeout", "100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stderr[-3000:]
    f = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f["model"] == "llama-tiny"
    assert f["paths_ok"]  # each run's node took the path asked for, every round
    assert [(r["chunked"], r["chunked_updates"]) for r in f["runs"]] == [(False, [0]),
                                                                         (True, [1])]
    assert all(r["node_exit_codes"] == [0] and r["rounds"] == 1 for r in f["runs"])
    c = f["per_codec"]["int8"]
    assert 100 < c["one_shot_peak_mb"] < 2000  # a process that imported torch
    assert 100 < c["chunked_peak_mb"] < 2000
    assert c["saved_mb"] == pytest.approx(c["one_shot_peak_mb"] - c["chunked_peak_mb"],
                                          abs=0.11)
    assert 100 < c["one_shot_encode_peak_mb"] < 2000  # the node's own log line
    assert 100 < c["chunked_encode_peak_mb"] < 2000
    assert c["encode_peak_saved_mb"] == pytest.approx(
        c["one_shot_encode_peak_mb"] - c["chunked_encode_peak_mb"], abs=0.11)
    assert f["est_125m_encode_peak_chunked_mb"] is None  # only from the topk configuration
