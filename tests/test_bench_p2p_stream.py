"""bench.p2p_stream in a tiny configuration: real peer processes (native_node.p2p.P2PRole over
aiortc channels on this machine's interfaces) reduce llama tiny-sized tensors in one frame
per shard and streamed; the streamed frames stay within a chunk, the one-frame ones do not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 65536  # --chunk-mb 0.0625


@pytest.mark.timeout(240)
def test_tiny_p2p_stream_bench_bounds_frames_and_reports_owner_memory() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.p2p_stream", "--flavour", "tiny",
                           "--peers", "2", "--chunk-mb", "0.0625"],
                          cwd=ROOT, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fig["bench"] == "p2p_stream"
    assert fig["n_params"] == 117056
    assert fig["same_aggregate"] is True
    frames = fig["max_shard_frame"]
    assert frames["streamed"] <= CHUNK + 4096  # a chunk plus header and signature
    assert frames["one-frame"] > 2 * 117056  # half the update in one frame
    for mode in ("one-frame", "streamed"):
        assert fig["owner_rss_growth_mb"][mode] >= 0
        assert fig["round_s"][mode] > 0
        assert fig["MB_per_peer"][mode] > 0.4  # its slices and the results (fp16) went out
