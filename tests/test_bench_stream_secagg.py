"""bench.stream_secagg in a tiny configuration: a real secure-aggregation server, real
WebSockets, masked updates in one frame and streamed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_tiny_stream_secagg_bench_commits_in_both_modes() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.stream_secagg", "--model",
                           "mlp-digits", "--flavour", "", "--participants", "2",
                           "--chunk-mb", "0.01", "--deadline-s", "10"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fig["bench"] == "stream_secagg"
    assert fig["n_params"] == 9610
    rows = {r["mode"]: r for r in fig["rows"]}
    assert set(rows) == {"single", "streamed"}
    for row in rows.values():
        assert row["participants"] == 2
        assert row["acked"] == 2  # the idle member masks nothing
        assert row["committed_rounds"] == 1
        assert row["rejected"] == {}
        assert row["errors"] == []
        assert row["peak_rss_mb"] >= row["baseline_rss_mb"] > 50
    assert rows["single"]["streamed_transfers"] == 0
    assert rows["streamed"]["streamed_transfers"] == 2  # every masked update came in chunks
    assert set(fig["growth_mb"]) == {"single_2", "streamed_2"}
