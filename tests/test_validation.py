"""Validation of updates by held-out loss: the pure rule, the round state, the scorer, and the
coordinator excluding a poisoned update (in-memory transport, real coordinator and store)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest

from ml.scoring import ProbeScorer, score_candidates
from server.runstate import open_run
from shared.errors import UpdateRejected
from shared.rounds import Decision, RoundPolicy, RoundState
from shared.validation import Score, Verdict, combine, judge, reference, rejected

A, B, C = "aa" * 32, "bb" * 32, "cc" * 32


def score(loss: float | None, node: str = A) -> Score:
    return Score(node_id=node, digest="dd" * 32, loss=loss)


@pytest.mark.parametrize(("ref", "loss", "ok"), [
    (2.0, 1.5, True),  # better
    (2.0, 2.1, True),  # worse by 5.0%: at the limit, kept
    (2.0, 2.1000001, False),  # just past the limit
    (2.0, 9.0, False),
    (2.0, None, False),  # not finite
    (2.0, math.inf, False),
    (None, 5.0, True),  # no reference: not judged
])
def test_judge_threshold_is_relative_to_the_reference(ref: float | None, loss: float | None,
                                                      ok: bool) -> None:
    v = judge(ref=ref, score=score(loss), threshold=0.05)
    assert v.ok is ok
    assert v.validator == "server"
    assert v.node_id == A
    if not ok and loss is not None and math.isfinite(loss):
        assert "limit +5.0%" in v.reason


def test_judge_refuses_a_negative_threshold() -> None:
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        judge(ref=1.0, score=score(1.0), threshold=-0.1)


def test_reference_is_the_worse_of_base_and_the_median_candidate() -> None:
    assert reference(2.0, [1.0, 1.2, 9.0]) == 2.0  # early: every honest model beats theta
    assert reference(0.4, [0.45, 0.5, 0.9, None]) == 0.5  # later: the median candidate
    assert reference(None, [1.0, math.inf, 3.0]) == 2.0
    assert reference(None, [None]) is None
    assert reference(math.nan, []) is None


def test_a_strict_majority_of_validators_rejects() -> None:
    def v(ok: bool, who: str) -> Verdict:
        return Verdict(node_id=A, digest="dd" * 32, ok=ok, reason="r", validator=who)

    assert rejected([v(False, "server")])
    assert not rejected([v(True, "server")])
    assert not rejected([v(False, "server"), v(True, B)])  # a tie keeps the update
    assert rejected([v(False, "server"), v(False, B), v(True, C)])
    assert not rejected([v(True, "server"), v(False, B), v(True, C)])  # one liar cannot veto
    groups = combine([v(True, "server"), v(False, B),
                      Verdict(node_id=B, digest="ee" * 32, ok=True, reason="", validator=C)])
    assert sorted(len(g) for g in groups.values()) == [1, 2]


def test_round_state_exclusion() -> None:
    st = RoundState(round=3, policy=RoundPolicy(quorum=2, deadline_s=10), opened_at=0.0)
    st.submit(node_id=A, round_=3, digest="11" * 32)
    st.submit(node_id=B, round_=3, digest="22" * 32)
    assert st.decide(1.0, [A, B]) is Decision.COMMIT
    st.exclude(B, "worse held-out loss")
    assert B not in st.updates
    assert st.excluded[B] == "worse held-out loss"
    # B answered the round: not waited for, but the round is now below quorum
    assert st.decide(1.0, [A, B]) is Decision.WAIT
    assert st.decide(11.0, [A, B]) is Decision.RETRY
    with pytest.raises(UpdateRejected):  # resubmitting the excluded update is refused
        st.check(node_id=B, round_=3, digest="22" * 32)
    st.submit(node_id=C, round_=3, digest="33" * 32)
    assert st.decide(1.0, [A, B, C]) is Decision.COMMIT


def test_probe_scorer_and_validator_role(tmp_path: Path) -> None:
    run = open_run(tmp_path / "run", {"model": "mlp-digits"})
    scorer = ProbeScorer(run.work, 64)
    theta = run.params
    rng = np.random.default_rng(0)
    good = np.zeros_like(theta)
    bad = (rng.standard_normal(theta.size) * 5).astype(np.float32)
    nan = np.full_like(theta, np.nan)
    base, losses = scorer.score(theta, [good, bad, nan])
    assert base is not None
    assert losses[0] == pytest.approx(base)
    assert losses[1] is not None
    assert losses[1] > base * 1.05
    assert losses[2] is None

    payloads = [b"\x00" + good.astype("<f4").tobytes(), b"\x00" + bad.astype("<f4").tobytes(),
                b"\x00junk"]
    base, got = score_candidates(ProbeScorer(run.work, 64, side="tail"), theta, payloads,
                                 length=run.n_params, codec="raw32", layout=run.work.manifest)
    assert base is not None
    assert len(got) == 3
    assert got[0] == pytest.approx(base, rel=1e-6)
    assert got[1] is not None
    assert got[1] > base * 1.05
    assert got[2] is None  # does not decode: scored "not finite", so rejected


def test_simulated_attack_is_excluded_and_recorded(tmp_path: Path) -> None:
    """2 of 6 nodes send scaled-up noise; with validation on, both updates are excluded
    every round, each sender gets an `update_rejected` error, and the store keeps the
    evidence (round, node, digest, reason) for every exclusion."""
    from bench.simulate import simulate

    out = asyncio.run(simulate(nodes=6, rounds=2, byzantine=1 / 3, attack="gaussian",
                               aggregator="mean", model="mlp-digits", inner_steps=5,
                               data_dir=tmp_path, progress=False,
                               extra_config={"validation": True}))
    s = out["summary"]
    assert s["rejected"].get("update_rejected") == 4  # 2 attackers x 2 rounds
    assert all(row["n_updates"] == 4 for row in out["rounds"][1:])
    run = open_run(tmp_path / "run", {})
    recs = run.store.rejections()
    assert len(recs) == 4
    assert {r["code"] for r in recs} == {"update_rejected"}
    assert all(r["validators"] == ["server"] and "held-out loss" in r["reason"] for r in recs)
    assert len({r["node_id"] for r in recs}) == 2
    assert s["final_eval_loss"] < s["initial_eval_loss"]
