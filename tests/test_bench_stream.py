"""bench.stream in a tiny configuration: real servers, real WebSockets, both modes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_tiny_stream_bench_commits_in_both_modes_and_leaves_no_spool() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.stream", "--model", "mlp-digits",
                           "--flavour", "", "--participants", "2", "--chunk-mb", "0.01",
                           "--deadline-s", "10"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fig["bench"] == "stream"
    assert fig["n_params"] == 9610
    assert [(r["mode"], r["participants"]) for r in fig["rows"]] == [("single", 2),
                                                                      ("streamed", 2)]
    for row in fig["rows"]:
        assert row["acked"] == 2  # the idle member gets none
        assert row["committed_rounds"] == 1
        assert row["rejected"] == {}
        assert row["errors"] == []
        assert row["spool_files_left"] == 0
        assert row["peak_rss_mb"] >= row["baseline_rss_mb"] > 50
    assert set(fig["growth_mb"]) == {"single_2", "streamed_2"}
