"""bench.secagg_robust at a tiny size: real secure aggregation per group, the table and the JSON
line's figures, exact sums, and the attackers' share of the groups in each scenario."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.secagg_robust import main


def test_tiny_grid_prints_the_figures_last(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    out = tmp_path / "sr.txt"
    assert main(["--participants", "9", "--assumed", "0.2", "--rounds", "1",
                 "--inner-steps", "2", "--attacks", "scaled", "--rules",
                 "mean,median+validation", "--jobs", "1", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    fig = json.loads(lines[-1])
    assert out.read_text().strip().splitlines()[-1] == lines[-1]
    assert fig["participants"] == 9
    assert fig["groups"] == 3  # f = 1 -> 2f + 1 = 3 groups of 3
    assert fig["tolerated"] == 1
    assert fig["attackers"] == {"minority": 1, "majority": 4}
    assert fig["spoiled"]["minority"] == 1.0  # one attacker spoils exactly one group
    assert fig["spoiled"]["majority"] >= 2.0  # 4 attackers in 3 groups of 3
    assert fig["sum_exact"] is True
    assert fig["secagg_rounds"] == 6 * 3  # (2 clean + 2 x 2 attacked) runs x 3 groups
    assert fig["dropped_after_submit"] == 6  # one per round, recovered
    for scenario in ("minority", "majority"):
        for rule in ("mean", "median+validation"):
            cell = fig["grid"][scenario][rule]["scaled"]
            assert 0.0 <= cell["acc"] <= 100.0
    assert set(fig["clean"]) == {"mean", "median+validation"}
    assert any(line.startswith("| median+validation |") for line in lines)
