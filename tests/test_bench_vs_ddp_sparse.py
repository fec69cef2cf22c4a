"""bench.vs_ddp --only sparseloco in its tiny configuration: DDP, raw32 and sparseloco-H10 at
the same H, and the figures the issue asks for (down_over_up in `best` and per config)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.vs_ddp_sparse import (
    config_name,
    down_over_up,
    gap_se,
    merge_repeats,
    repeat_keys,
    sparse_figures,
    targets_md,
    with_raw32,
)

ROOT = Path(__file__).resolve().parent.parent


def test_names_and_raw32_at_the_same_h() -> None:
    runs = ((10, "raw32"), (50, "raw32"), (50, "sparseloco"), (50, "sparseloco-nesterov"))
    assert config_name(50, "sparseloco") == "sparseloco-H50"
    assert config_name(50, "sparseloco-nesterov") == "sparseloco-H50-nesterov"
    assert config_name(10, "raw32") == "diloco-H10-raw32"
    assert with_raw32(["sparseloco-H50"], runs) == {"diloco-H50-raw32"}
    rows = [{"bytes_up": 10, "bytes_down": 500}, {"bytes_up": 10, "bytes_down": 15},
            {"bytes_up": 20, "bytes_down": 20}]
    assert down_over_up(rows) == pytest.approx(1.25)  # the join's round left out


def test_repeats_merge_to_means_with_their_spread() -> None:
    assert repeat_keys("m/c/abc", 3) == ["m/c/abc", "m/c/abc#r1", "m/c/abc#r2"]
    assert repeat_keys("m/c/abc", 1) == ["m/c/abc"]

    def run(loss: float, up: float) -> dict[str, object]:
        return {"config": "sparseloco-H25", "H": 25, "final_eval_loss": loss,
                "bytes_up_payload": up, "run_s": 10.0, "codec": "sparseloco",
                "curve": [[0, 0.0, 0.0, 2.0], [25, up, 1.0, loss]]}

    one = run(1.0, 4.0)
    assert merge_repeats([one]) is one  # a single run is reported as it is
    m = merge_repeats([run(1.0, 4.0), run(1.2, 6.0), run(1.1, 5.0)])
    assert m["final_eval_loss"] == pytest.approx(1.1)
    assert m["bytes_up_payload"] == pytest.approx(5.0)
    assert m["run_s"] == pytest.approx(30.0)  # the time of all the runs
    assert m["H"] == 25
    assert m["config"] == "sparseloco-H25"
    assert m["codec"] == "sparseloco"
    assert m["repeats"] == 3
    assert m["final_eval_loss_runs"] == [1.0, 1.2, 1.1]
    assert m["final_eval_loss_sd"] == pytest.approx(0.1)
    assert m["curve"][1] == pytest.approx([25, 5.0, 1.0, 1.1])
    base = merge_repeats([run(1.0, 1.0), run(1.0, 1.0)])  # no spread in the baseline
    # se of the relative gap: sd / sqrt(n) / base for the mean of 3 runs with sd 0.1
    assert gap_se(m, base) == pytest.approx(0.1 / 3 ** 0.5)
    assert gap_se(m, one) is None  # a single run has no spread
    assert isinstance(m["H"], int)  # what the runs share stays as it is (names are made of it)
    raw = merge_repeats([{**run(1.0, 9.0), "config": "diloco-H25-raw32", "codec": "raw32"},
                         {**run(1.0, 9.0), "config": "diloco-H25-raw32", "codec": "raw32"}])
    m.update(loss_gap_vs_ddp=0.0, bytes_ratio_vs_ddp=1000.0, compression_savings=0.96,
             compression_loss_gap=0.1)
    f = sparse_figures([m, raw])
    assert f is not None
    assert f["compression_loss_gap_se"] == pytest.approx(0.1 / 3 ** 0.5)
    assert f["loss_runs"]["sparseloco-H25"]["runs"] == [1.0, 1.2, 1.1]
    assert "| sparseloco-H25 | 1.0000, 1.2000, 1.1000 | 1.1000 | 0.1000 |" in targets_md(f)


@pytest.mark.timeout(300)
def test_quick_sparseloco_grid(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.vs_ddp", "--quick", "--only",
                           "sparseloco", "--fresh", "--repeats", "1", "--out-dir", str(tmp_path)],
                          cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "down_over_up" in fig["best"]
    data = json.loads((tmp_path / "vs_ddp_sparseloco.json").read_text())
    configs = {r["config"]: r for r in data["configs"]["mlp-digits"]}
    assert set(configs) == {"ddp-allreduce", "diloco-H10-raw32", "sparseloco-H10"}
    sp = configs["sparseloco-H10"]
    # 9,610 params: three signed frames down (RoundOpen, Ack, RoundCommitted) per Submit up
    # outweigh the 3% payloads; gpt-tiny's figure is in bench/results/vs_ddp_sparseloco.txt
    assert 0 < sp["down_over_up"] < 3
    assert sp["bytes_down_payload"] < configs["diloco-H10-raw32"]["bytes_down_payload"]
    assert sp["compression_savings"] > 0
    s = fig["sparseloco"]
    assert s["config"] == "sparseloco-H10"
    assert set(s["targets"]) == {"bytes_ratio_1000x", "loss_within_1pct",
                                 "compression_savings_95pct", "compression_gap_1pct",
                                 "down_over_up_2"}
    # one run of each (CI time): repeats are merged by merge_repeats, tested above
    assert "final_eval_loss_runs" not in sp
    assert s["compression_loss_gap_se"] is None  # a single run has no spread
    assert set(fig["from_cache"]) == set()  # --fresh: every run made now
    md = (tmp_path / "vs_ddp_sparseloco.md").read_text()
    assert "SparseLoCo targets" in md
    assert "Final eval loss of each run" not in md  # only with --repeats > 1
