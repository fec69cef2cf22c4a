"""bench.tab_stream in a tiny configuration (gpt-tiny, 0.05 MB chunks, one round): a real
server and a Chromium tab per path; the tab's streamed update goes over the path named, one
chunk at a time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from e2e.conftest import CHROMIUM, ROOT, ensure_vendored


@pytest.mark.timeout(300)
def test_tiny_tab_stream_bench_uploads_over_both_paths() -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM}")
    ensure_vendored()
    proc = subprocess.run([sys.executable, "-m", "bench.tab_stream", "--model", "gpt-tiny",
                           "--flavour", "", "--chunk-mb", "0.05", "--rounds", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fig["bench"] == "tab_stream"
    ws, rtc = fig["rows"]
    assert (ws["path"], rtc["path"]) == ("ws", "rtc")
    n = -(-(4 * 108320 + 1) // int(0.05 * 2**20))  # gpt-tiny, raw32: a 1-byte header
    for row in (ws, rtc):
        assert row["accepted"] == row["uploads"] == 1, row
        assert row["chunks"] == n, row
        assert row["upload_ms"] > 0, row
        assert 1 <= row["max_queued_frames"] <= 2, row
        assert row["console_errors"] == [], row
    assert (ws["chunks_ws"], ws["chunks_rtc"], ws["submits_ws"]) == (n, 0, 1), ws
    assert (rtc["chunks_rtc"], rtc["chunks_ws"], rtc["submits_rtc"]) == (n, 0, 1), rtc
