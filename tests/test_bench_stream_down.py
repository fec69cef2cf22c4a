"""bench.stream_down in a tiny configuration: real servers, real WebSockets, both modes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_tiny_stream_down_bench_hands_out_the_params_in_both_modes() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.stream_down", "--flavour", "tiny",
                           "--joiners", "2", "--chunk-mb", "0.05"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fig["bench"] == "stream_down"
    assert [(r["mode"], r["joiners"]) for r in fig["rows"]] == [("single", 2), ("streamed", 2)]
    single, streamed = fig["rows"]
    assert single["streamed_joins"] == 0  # one RoundOpen frame each
    assert streamed["streamed_joins"] == 2  # the manifest, then the chunks
    for row in fig["rows"]:
        assert row["errors"] == []
        assert row["params_mb"] == pytest.approx(4 * 102_720 / 2**20, abs=0.01)
        assert row["peak_rss_mb"] >= row["baseline_rss_mb"] > 50
    assert set(fig["growth_mb"]) == {"single_2", "streamed_2"}
