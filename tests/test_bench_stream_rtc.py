"""bench.stream_rtc in a tiny configuration: a real star server, real aiortc data channels
(in a private network namespace the bench makes), both modes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.netns import available

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(available() is not None,
                    reason=f"no private network namespace: {available()}")
@pytest.mark.timeout(300)
def test_tiny_stream_rtc_bench_uploads_over_the_channels_in_both_modes() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.stream_rtc", "--model", "gpt-tiny",
                           "--flavour", "", "--participants", "2", "--chunk-mb", "0.01",
                           "--deadline-s", "10"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fig["bench"] == "stream_rtc"
    assert fig["n_params"] == 108320
    single, streamed = fig["rows"]
    assert (single["mode"], streamed["mode"]) == ("single", "streamed")
    for row in (single, streamed):
        assert row["acked"] == 2  # the idle member gets none
        assert row["committed_rounds"] == 1
        assert row["rejected"] == {}
        assert row["errors"] == []  # no update went over the WebSocket
        assert row["transports"] == ["webrtc"] * 3
        assert row["upload_MBps"] > 0
    assert single["stream"]["chunks"] == 0
    n_chunks = -(-(4 * 108320 + 1) // int(0.01 * 2**20))  # raw32: a 1-byte header
    assert streamed["stream"]["submits_rtc"] == 2
    assert streamed["stream"]["chunks_rtc"] == 2 * n_chunks
    assert streamed["stream"]["chunks_ws"] == 0
    assert set(fig["growth_mb"]) == {"single", "streamed"}
