"""bench.vs_ddp --only sparseloco in its tiny configuration: DDP, raw32 and sparseloco-H10 at
the same H, and the figures the issue asks for (down_over_up in `best` and per config)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.vs_ddp_sparse import config_name, down_over_up, with_raw32

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


@pytest.mark.timeout(300)
def test_quick_sparseloco_grid(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.vs_ddp", "--quick", "--only",
                           "sparseloco", "--fresh", "--out-dir", str(tmp_path)], cwd=ROOT,
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
    assert "SparseLoCo targets" in (tmp_path / "vs_ddp_sparseloco.md").read_text()
