"""bench.dp at a tiny size: the JSON line's fields, epsilon from the accountant for the draws
it took, the same data and samples with and without DP, and DP costing loss when the noise
is overwhelming (repeatably: the bench seeds its noise)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.dp import main, run
from server.dp_accountant import epsilon


def test_cli_prints_the_figures_last(capsys: pytest.CaptureFixture[str], tmp_path: Path
                                     ) -> None:
    out = tmp_path / "dp.txt"
    assert main(["--participants", "100", "--rounds", "3", "--seeds", "0", "--rate", "0.3",
                 "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fig = json.loads(last)
    for key in ("participants", "per_round", "rounds", "sigma", "clip", "epsilon", "delta",
                "accountant", "loss_nonprivate", "loss_private", "loss_gap"):
        assert key in fig, key
    assert fig["participants"] == 100
    assert 10 < fig["per_round"] < 50
    assert fig["epsilon"] == pytest.approx(epsilon(sigma=fig["sigma"], q=0.3,
                                                   steps=fig["accountant_steps"],
                                                   delta=1e-5), abs=1e-4)
    assert fig["loss_gap"] == pytest.approx(
        (fig["loss_private"] - fig["loss_nonprivate"]) / fig["loss_nonprivate"], abs=2e-3)
    assert fig["reference"]["epsilon"]["rdp"] == pytest.approx(2.5966, abs=2e-3)
    assert out.read_text().strip().splitlines()[-1] == last


def test_overwhelming_noise_costs_loss() -> None:
    kw = {"participants": 100, "rate": 0.5, "clip": 0.5, "rounds": 4, "inner_steps": 5,
          "batch": 8, "inner_lr": 1e-3, "outer_lr": 0.7, "seed": 0, "say": lambda _: None}
    plain = run(**kw, sigma=0.0, private=False)  # type: ignore[arg-type]
    loud = run(**kw, sigma=50.0, private=True)  # type: ignore[arg-type]
    assert plain["steps"] == loud["steps"] == 4
    assert loud["loss"] > 1.5 * plain["loss"]
    again = run(**kw, sigma=50.0, private=True)  # type: ignore[arg-type]
    assert again["loss"] == loud["loss"]  # the noise is seeded: a rerun repeats the figures


def test_parallel_runs_give_the_same_figures(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--participants", "100", "--rounds", "2", "--inner-steps", "2", "--seeds", "0",
            "--rate", "0.5", "--out", ""]
    assert main(args) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "--jobs", "2"]) == 0
    two = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("loss_private", "loss_nonprivate", "epsilon", "per_round"):
        assert one[key] == two[key], key
