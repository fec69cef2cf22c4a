"""bench.vs_ddp: the quick grid end to end (DDP with gloo + the real server and nodes)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import vs_ddp

ROOT = Path(__file__).resolve().parent.parent


def _run(out_dir: Path, *extra: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "bench.vs_ddp", "--quick", "--out-dir",
                           str(out_dir), *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ETA" in proc.stderr or "--fresh" not in extra
    return proc.stdout.strip().splitlines()


@pytest.mark.timeout(300)
def test_quick_grid_json_shape_and_cache(tmp_path: Path) -> None:
    fig = json.loads(_run(tmp_path, "--fresh")[-1])
    assert fig["from_cache"] == []  # --fresh: every configuration was run now
    assert fig["wan_method"] == "model"
    assert fig["model"] == "mlp-digits"
    best = fig["best"]
    assert {"config", "bytes_ratio_vs_ddp", "loss_gap_vs_ddp", "utilization_wan"} <= set(best)
    assert best["config"] == "diloco-H10-raw32"
    assert best["bytes_ratio_vs_ddp"] > 1  # 2 rounds of params vs 20 all-reduces
    assert abs(best["loss_gap_vs_ddp"]) < 1.0
    assert 0 < best["utilization_wan"] <= 1
    assert 0 < fig["ddp_utilization_wan"] <= 1
    # DDP pays 20 all-reduces x 2 latency hops x 50 ms on the modelled link
    assert fig["ddp_utilization_wan"] < best["utilization_wan"]
    for key in ("compression_savings", "compression_loss_gap"):  # no compressed run in --quick
        assert key in fig
        assert fig[key] is None
    assert set(fig["targets"]) == {"bytes_ratio_500x", "loss_within_3pct",
                                   "compression_savings_92pct", "compression_gap_1pct",
                                   "utilization_wan_90pct"}
    assert 0 < fig["ddp_final_eval_loss"] < 2.31  # below ln(10) after 20 steps
    data = json.loads((tmp_path / "vs_ddp.json").read_text())
    configs = {r["config"]: r for r in data["configs"]["mlp-digits"]}
    assert set(configs) == {"ddp-allreduce", "diloco-H10-raw32"}
    for r in configs.values():
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in
                   ("bytes_transport", "bytes_up_payload", "bytes_down_payload", "compute_s",
                    "wall_s", "wan_time_s", "final_eval_loss"))
        assert r["bytes_transport"] >= 0.9 * (r["bytes_up_payload"] + r["bytes_down_payload"])
    dil = configs["diloco-H10-raw32"]
    assert dil["rounds"] == 2
    assert dil["bytes_down_payload"] > 2 * 4 * 9610  # params, twice
    for name in ("vs_ddp.md", "vs_ddp_loss_vs_bytes.png", "vs_ddp_loss_vs_wan_time.png",
                 "vs_ddp-cache.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert "diloco-H10-raw32" in (tmp_path / "vs_ddp.md").read_text()

    fig2 = json.loads(_run(tmp_path)[-1])
    # the second run read every configuration from the cache, and got the same figures
    assert sorted(fig2["from_cache"]) == ["mlp-digits/ddp-allreduce",
                                          "mlp-digits/diloco-H10-raw32"]
    assert fig2["best"] == fig["best"]


def test_wan_model_charges_latency_per_message() -> None:
    g = vs_ddp.Grid("mlp-digits", None, 4, 4, 32, 0.01, ((2, "raw32"),), 2,
                    ddp_hooks=("allreduce",))
    ranks = [{"compute_s": [0.01] * 4, "all_reduce_bytes": [1000] * 4,
              "all_reduce_calls": [1] * 4, "t_start": 0.0, "t_end": 1.0} for _ in range(4)]
    res = vs_ddp.summarize_ddp(g, "allreduce", {"ranks": ranks, "lo_tx_bytes": 4 * 8000,
                                                "wall_total_s": 2.0}, True, [2.0, 1.5, 1.0])
    # 4 steps x (10 ms + 2000 B / 12.5 MB/s + 4 hops x 50 ms)
    assert res["wan_time_s"] == pytest.approx(4 * (0.01 + 2000 / 12.5e6 + 0.2))
    assert res["bytes_transport"] == 16000  # sent + received per worker
    assert [pt[0] for pt in res["curve"]] == [0, 2, 4]
