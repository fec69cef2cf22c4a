"""bench.simulate: a small in-process swarm through the real coordinator, with attackers."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.simulate import main, simulate
from server.store import Store
from shared.aggregation import Rule, get_rule
from shared.vec import Vector


def test_small_run_with_sign_flip_attackers_under_median(tmp_path: Path) -> None:
    out = asyncio.run(simulate(nodes=8, rounds=2, byzantine=0.25, attack="sign-flip",
                               aggregator="median", inner_steps=10, seed=1,
                               data_dir=tmp_path, progress=False))
    s, rows = out["summary"], out["rounds"]
    assert s["byzantine"] == 2
    assert s["rounds"] == 2
    assert s["node_errors"] == 0
    assert s["rejected"] == {}
    committed = rows[1:]
    assert [r["round"] for r in committed] == [0, 1]
    for r in committed:  # every node's signed update was accepted and aggregated
        assert r["n_updates"] == 8
        assert r["accepted"] == 8
        assert r["rejected"] == 0
    losses = [rows[0]["eval_loss"]] + [r["eval_loss"] for r in committed]
    assert losses[-1] < losses[0]
    assert losses[2] < losses[1]
    assert s["final_accuracy"] > s["initial_accuracy"]
    # the rounds were committed to the run's store (SQLite + safetensors) like a real run
    store = Store(tmp_path / "run")
    stored = store.rounds(since=-1, limit=10)
    assert [r["round"] for r in stored] == [0, 1]
    assert all(r["n_updates"] == 8 for r in stored)


def test_alie_needs_the_honest_updates_and_commits(tmp_path: Path) -> None:
    out = asyncio.run(simulate(nodes=10, rounds=1, byzantine=0.2, attack="alie",
                               aggregator="trimmed-mean", inner_steps=5, opt_state="fresh",
                               data_dir=tmp_path, progress=False))
    row = out["rounds"][1]
    assert row["n_updates"] == 10
    assert row["accepted"] == 10
    assert out["summary"]["opt_state"] == "fresh"
    assert np.isfinite(row["eval_loss"])


def test_cli_prints_json_last(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--nodes", "4", "--rounds", "1", "--byzantine", "0.25", "--attack", "ipm",
                 "--attack-param", "epsilon=0.5", "--aggregator", "median",
                 "--inner-steps", "3", "--data-dir", str(tmp_path), "--quiet",
                 "--torch-threads", "0"]) == 0  # 0: leave this process's torch threads
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = json.loads(last)
    assert set(figures) == {"nodes", "rounds", "wall_s", "peak_rss_mb", "final_eval_loss",
                            "final_accuracy", "attack", "aggregator", "byzantine", "p2p_results"}
    assert figures["nodes"] == 4
    assert figures["rounds"] == 1
    assert figures["byzantine"] == 1
    assert figures["p2p_results"] is None  # exact aggregates unless --p2p-results


@pytest.mark.parametrize("p2p_results", [None, "fp16"])
def test_centered_clipping_starts_from_the_previous_aggregate_with_history(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, p2p_results: str | None) -> None:
    """Also: with --p2p-results the aggregate is rounded through the codec before the outer
    step, so the next round's reference is the rounded aggregate."""
    import server.reduction as reduction

    calls: list[tuple[np.ndarray, np.ndarray]] = []

    def recording(name: str) -> Rule:
        rule = get_rule(name)  # what server.reduction imports

        def wrapped(vectors: list[Vector], **kw: Any) -> Vector:
            out = rule(vectors, **kw)
            calls.append((np.array(kw["reference"]), np.array(out)))
            return out
        return wrapped

    monkeypatch.setattr(reduction, "get_rule", recording)
    asyncio.run(simulate(nodes=4, rounds=3, byzantine=0.0, attack="sign-flip",
                         aggregator="centered-clipping", inner_steps=3, data_dir=tmp_path,
                         progress=False, extra_config={
                             "cc_reference": "history", "outer_momentum": 0.0,
                             "worker_momentum": 0.5, "aggregator_params": {"tau": 0.05}},
                         result_codec=p2p_results))
    assert len(calls) == 3
    assert not calls[0][0].any()  # round 0: no history yet
    for (_, prev_out), (ref, _) in itertools.pairwise(calls):
        applied = prev_out if p2p_results is None else prev_out.astype(np.float16)
        np.testing.assert_array_equal(ref, applied.astype(np.float32))  # mu = 0: the last one
        assert np.linalg.norm(prev_out) > 0
        if p2p_results is not None:
            assert not np.array_equal(ref, prev_out)  # the rounding did happen
