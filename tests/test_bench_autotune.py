"""bench.autotune: deterministic, prints its JSON last, and honours the budget rule."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

import bench.autotune as bench


def test_quick_run_is_deterministic_and_ends_with_its_json(
        capsys: pytest.CaptureFixture[str]) -> None:
    torch.set_num_threads(1)
    outs: list[dict[str, Any]] = []
    for _ in range(2):
        assert bench.main(["--quick", "--horizon-s", "1.5", "--show-changes", "0"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        outs.append(json.loads(lines[-1]))
    assert outs[0] == outs[1]  # virtual time only: the same figures every run
    out = outs[0]
    assert set(out) >= {"population", "auto", "best_fixed", "grid_size",
                        "speedup_vs_one_node", "targets"}
    assert out["grid_size"] == 2  # --quick
    assert set(out["auto"]) >= {"time_to_target_s", "final_loss", "decisions"}
    assert out["auto"]["decisions"] >= 1
    assert out["population"]["tab"]["count"] == 8
    assert out["best_fixed"]["config"]["H"] == 10
    assert out["best_fixed"]["best_loss"] <= out["best_fixed"]["final_loss"]
    assert out["auto"]["best_loss"] <= out["auto"]["final_loss"]
    assert out["lowest_fixed_final_loss"]["final_loss"] <= out["best_fixed"]["final_loss"]
    assert "horizon" in out["final_loss_rule"]


def test_a_budget_round_trains_what_fits() -> None:
    world = bench.World(0)
    nodes = bench.population([("fast box", 1, 0.002, 1000.0, 1000.0, 0.005),
                              ("tab", 1, 0.055, 10.0, 1.0, 0.04)])
    res = bench.simulate(world, nodes, horizon_s=3.0, target=0.0, fixed=None, name="auto")
    assert res.decisions == res.rounds >= 2
    assert any("s of training per node" in c for c in res.changes)
    # the probe round trains H/5 = 10 steps on each; the budget rounds differ per node
    assert res.steps > 2 * 10


def test_only_rounds_committed_by_the_horizon_count() -> None:
    """Every run is measured at the same virtual time: a round that would commit after the
    horizon is not part of the run (a longer horizon's curve extends the shorter one)."""
    world = bench.World(0)
    kinds = [("fast box", 1, 0.002, 1000.0, 1000.0, 0.005),
             ("slow box", 1, 0.016, 50.0, 10.0, 0.02)]  # no tab: no link degrades
    runs = {h: bench.simulate(world, bench.population(kinds), horizon_s=h, target=0.0,
                              fixed=(10, ("raw32", 0.01)), name="H 10") for h in (1.0, 2.0)}
    short, long = runs[1.0], runs[2.0]
    assert all(t <= 1.0 for t, _ in short.curve)
    assert short.rounds == len(short.curve) - 1 >= 2
    assert long.curve[:len(short.curve)] == short.curve
    assert long.curve[len(short.curve)][0] > 1.0  # the next commit lies past the short horizon
    assert short.final_loss == short.curve[-1][1]
    assert short.best_loss == min(loss for _, loss in short.curve)
    assert short.steps == 10 * 2 * short.rounds  # two nodes, H 10 each, counted rounds only
