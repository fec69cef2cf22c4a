"""bench.byzantine: the quick grid end to end (real coordinator, in-process) and agg_ms timing."""

from __future__ import annotations

import json
import math

import pytest

from bench import byzantine


def _finite_leaves(obj: object) -> list[float]:
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _finite_leaves(x)]
    if isinstance(obj, list):
        return [v for x in obj for v in _finite_leaves(x)]
    if isinstance(obj, float):
        return [obj]
    return []


def test_quick_grid_json_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert byzantine.main(["--quick"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    fig = json.loads(out[-1])
    assert fig["default_rule"] == byzantine.DEFAULT_RULE
    assert {"worst_loss_ratio_33", "worst_acc_drop_33", "agg_ms", "grid", "clean",
            "settings", "targets_met"} <= set(fig)
    assert fig["worst_loss_ratio_33"] is None  # no gpt-tiny in the quick grid
    assert isinstance(fig["worst_acc_drop_33"], float)
    cells = fig["grid"]["mlp-digits"]["0.33"]
    assert set(cells) == {"mean", byzantine.DEFAULT_ROW}
    for row in cells.values():
        assert set(row) == {"sign-flip", "alie"}
        assert all(isinstance(v, float) and 0.0 <= v <= 100.0 for v in row.values())
    assert set(fig["clean"]["mlp-digits"]) == {"mean", byzantine.DEFAULT_ROW}
    assert fig["failed_runs"] == 0
    assert all(math.isfinite(v) for v in _finite_leaves(fig))
    assert fig["settings"]["attackers"] == {"0.33": 2}
    assert any(line.startswith("| rule | clean | clean, f assumed | sign-flip | alie |")
               for line in out)
    assert set(fig["clean_f_assumed"]["mlp-digits"]["0.33"]) == {"mean", byzantine.DEFAULT_ROW}


def test_theory_exclusions_are_reported() -> None:
    assert byzantine.excluded("mlp-digits", "krum", "alie", 10, 0.45) is not None  # f=4, n<11
    assert byzantine.excluded("mlp-digits", "krum", "alie", 10, 1 / 3) is None  # f=3, n>=9
    assert "4f+3" in (byzantine.excluded("mlp-digits", "bulyan", "ipm", 10, 0.2) or "")
    assert byzantine.excluded("mlp-digits", "median", "alie", 10, 0.45) is None
    assert byzantine.excluded("mlp-digits", "mean", "label-flip", 10, 0.1) is None
    assert byzantine.n_attackers(10, 1 / 3) == 3
    assert byzantine.n_attackers(10, 0.45) == 4


def test_agg_ms_small() -> None:
    from shared.aggregation import RULES

    ms = byzantine.time_rules(RULES, n=11, d=2000, f=2, repeats=2)
    assert set(ms) == set(RULES)
    assert all(math.isfinite(v) and v >= 0.0 for v in ms.values())


def test_agg_only_prints_agg_ms_alone(capsys: pytest.CaptureFixture[str]) -> None:
    assert byzantine.main(["--agg-only", "--agg-n", "11", "--agg-d", "3000", "--agg-f", "2",
                           "--agg-repeats", "2"]) == 0
    fig = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(fig) == {"agg_ms", "agg_ms_setup"}  # no grid: no cell was run
    assert fig["agg_ms_setup"]["statistic"] == "min"
    assert fig["agg_ms_setup"]["n"] == 11
    assert all(math.isfinite(v) and v >= 0.0 for v in fig["agg_ms"].values())


def test_agg_speed_tiny_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import agg_speed

    assert agg_speed.main(["--n", "11", "--d", "2000", "--f", "2", "--repeats", "1",
                           "--rounds", "2", "--peers-python", "", "--before", "HEAD",
                           "--clock", "cpu", "--separate"]) == 0
    fig = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fig["setup"]["rounds"] == 2
    assert fig["setup"]["clock"] == "cpu"
    assert fig["before_error"] is None
    assert set(fig["before_ms"]) == set(fig["agg_ms"]) == set(agg_speed.RULES)
    assert set(fig["agg_ms_separate"]) == set(agg_speed.RULES)
    assert fig["peers_error"]  # no peers interpreter: said, and no peer figure invented
    assert fig["all_at_or_below_best"] is None
    assert agg_speed.fastest({"a": 2.0, "b": 1.0}, {"a": 1.5, "b": 3.0}) == {"a": 1.5, "b": 1.0}
