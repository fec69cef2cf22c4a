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


def test_a_budget_round_trains_what_fits() -> None:
    world = bench.World(0)
    nodes = bench.population([("fast box", 1, 0.002, 1000.0, 1000.0, 0.005),
                              ("tab", 1, 0.055, 10.0, 1.0, 0.04)])
    res = bench.simulate(world, nodes, horizon_s=2.0, target=0.0, fixed=None, name="auto")
    assert res.decisions == res.rounds >= 2
    assert any("s of training per node" in c for c in res.changes)
    # the probe round trains H/5 = 10 steps on each; the budget rounds differ per node
    assert res.steps > 2 * 10
