"""bench.abuse and the live fuzzer against a real server process (loopback): their last line
holds the figures issue 24 asks for, and every one is at its target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from tests.conftest import ROOT


def last_json(args: list[str], timeout: float) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    figures: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def test_bench_abuse_refuses_every_attack_while_honest_rounds_commit() -> None:
    f = last_json(["bench.abuse", "--junk-connections", "20", "--junk-after-close", "800"], 300)
    assert f["cases"] == f["cases_ok"]
    assert int(f["cases"]) >= 15
    for key in ("server_exits", "accepted_invalid", "api_invalid_json",
                "frames_processed_after_close"):
        assert f[key] == 0, (key, f)
    assert float(f["cpu_ms_per_junk_frame"]) > 0, f  # (its bound is a bench figure, not a test)
    assert int(f["stored_rows_per_node_max"]) <= int(f["stored_rows_bound"]), f
    assert int(f["honest_rounds_committed"]) >= 1, f


def test_live_fuzzer_finds_no_crash() -> None:
    f = last_json(["bench.fuzz_frames", "--live", "--seconds", "10", "--seed", "1"], 300)
    assert f["live"] is True, f
    assert f["crashes"] == 0, f
    assert int(f["inputs"]) > 20, f
