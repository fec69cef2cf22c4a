"""Tests for shared.rounds: the pure round state machine (quorum, deadline, retry, duplicates)."""

from __future__ import annotations

import pytest

from shared.errors import ConflictingUpdate, WrongRound
from shared.rounds import Decision, Outcome, RoundPolicy, RoundState

A, B, C = "a" * 64, "b" * 64, "c" * 64
D1, D2 = "1" * 64, "2" * 64


def state(*, quorum: int = 2, deadline_s: float = 10.0, round_: int = 3,
          opened_at: float = 100.0) -> RoundState:
    return RoundState(round=round_, policy=RoundPolicy(quorum=quorum, deadline_s=deadline_s),
                      opened_at=opened_at)


# -- policy ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("quorum", "deadline_s"), [(0, 1.0), (-1, 1.0), (1, 0.0), (1, -5.0),
                                                    (1, float("nan"))])
def test_policy_refuses_bad_values(quorum: int, deadline_s: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        RoundPolicy(quorum=quorum, deadline_s=deadline_s)


def test_deadline_and_remaining() -> None:
    s = state(deadline_s=10.0, opened_at=100.0)
    assert s.deadline_at == 110.0
    assert s.remaining(100.0) == 10.0
    assert s.remaining(107.5) == 2.5
    assert s.remaining(110.0) == 0.0
    assert s.remaining(500.0) == 0.0


# -- decide ------------------------------------------------------------------------------------
def test_commit_as_soon_as_all_active_submitted_and_quorum_met() -> None:
    s = state(quorum=2)
    assert s.submit(node_id=A, round_=3, digest=D1) is Outcome.ACCEPTED
    assert s.decide(101.0, active=[A, B]) is Decision.WAIT
    assert s.submit(node_id=B, round_=3, digest=D2) is Outcome.ACCEPTED
    # long before the deadline
    assert s.decide(101.0, active=[A, B]) is Decision.COMMIT


def test_all_active_submitted_but_below_quorum_waits() -> None:
    s = state(quorum=3)
    s.submit(node_id=A, round_=3, digest=D1)
    s.submit(node_id=B, round_=3, digest=D1)
    assert s.decide(101.0, active=[A, B]) is Decision.WAIT
    assert s.decide(109.999, active=[A, B]) is Decision.WAIT


def test_waits_while_an_active_participant_has_not_submitted() -> None:
    s = state(quorum=1)
    s.submit(node_id=A, round_=3, digest=D1)
    for now in (100.0, 105.0, 109.99):
        assert s.decide(now, active=[A, B, C]) is Decision.WAIT


def test_disconnected_participant_no_longer_blocks() -> None:
    s = state(quorum=2)
    s.submit(node_id=A, round_=3, digest=D1)
    s.submit(node_id=B, round_=3, digest=D1)
    assert s.decide(102.0, active=[A, B, C]) is Decision.WAIT
    # C drops out of `active`
    assert s.decide(102.0, active=[A, B]) is Decision.COMMIT


def test_submitted_then_disconnected_still_counts() -> None:
    s = state(quorum=2)
    s.submit(node_id=A, round_=3, digest=D1)
    s.submit(node_id=B, round_=3, digest=D1)
    # A left after submitting: its update still counts toward quorum
    assert s.decide(101.0, active=[B]) is Decision.COMMIT
    assert s.decide(101.0, active=[]) is Decision.COMMIT


def test_nobody_active_and_nothing_submitted_waits_until_deadline() -> None:
    s = state(quorum=1)
    assert s.decide(101.0, active=[]) is Decision.WAIT
    assert s.decide(110.0, active=[]) is Decision.RETRY


def test_deadline_with_quorum_commits() -> None:
    s = state(quorum=2)
    s.submit(node_id=A, round_=3, digest=D1)
    s.submit(node_id=B, round_=3, digest=D1)
    assert s.decide(109.9, active=[A, B, C]) is Decision.WAIT
    assert s.decide(110.0, active=[A, B, C]) is Decision.COMMIT  # exactly at the deadline
    assert s.decide(150.0, active=[A, B, C]) is Decision.COMMIT


def test_deadline_below_quorum_retries_then_keeps_updates() -> None:
    s = state(quorum=3, deadline_s=10.0)
    s.submit(node_id=A, round_=3, digest=D1)
    s.submit(node_id=B, round_=3, digest=D2)
    assert s.decide(110.0, active=[A, B, C]) is Decision.RETRY
    assert s.attempt == 0

    s.retry(112.0)
    assert s.attempt == 1
    assert s.round == 3  # same round number
    assert s.updates == {A: D1, B: D2}  # updates kept
    assert s.opened_at == 112.0
    assert s.deadline_at == 122.0  # a fresh deadline
    assert s.remaining(112.0) == 10.0
    assert s.decide(115.0, active=[A, B, C]) is Decision.WAIT
    # the kept updates still count, and are not re-accepted
    assert s.submit(node_id=A, round_=3, digest=D1) is Outcome.DUPLICATE
    assert s.submit(node_id=C, round_=3, digest=D1) is Outcome.ACCEPTED
    assert s.decide(115.0, active=[A, B, C]) is Decision.COMMIT

    s.retry(130.0)
    assert s.attempt == 2


def test_retry_again_below_quorum() -> None:
    s = state(quorum=2, deadline_s=5.0)
    s.submit(node_id=A, round_=3, digest=D1)
    assert s.decide(105.0, active=[A]) is Decision.RETRY
    s.retry(105.0)
    assert s.decide(109.0, active=[A]) is Decision.WAIT
    assert s.decide(110.0, active=[A]) is Decision.RETRY  # never committed on too few


# -- submit / check ----------------------------------------------------------------------------
def test_duplicate_is_counted_once() -> None:
    s = state(quorum=2)
    assert s.submit(node_id=A, round_=3, digest=D1) is Outcome.ACCEPTED
    assert s.submit(node_id=A, round_=3, digest=D1) is Outcome.DUPLICATE
    assert s.submit(node_id=A, round_=3, digest=D1) is Outcome.DUPLICATE
    assert s.updates == {A: D1}
    # one node twice does not make a quorum of two
    assert s.decide(200.0, active=[A]) is Decision.RETRY


def test_same_digest_from_different_nodes_counts_twice() -> None:
    s = state(quorum=2)
    assert s.submit(node_id=A, round_=3, digest=D1) is Outcome.ACCEPTED
    assert s.submit(node_id=B, round_=3, digest=D1) is Outcome.ACCEPTED
    assert len(s.updates) == 2


def test_same_node_different_digest_conflicts() -> None:
    s = state()
    s.submit(node_id=A, round_=3, digest=D1)
    with pytest.raises(ConflictingUpdate) as info:
        s.submit(node_id=A, round_=3, digest=D2)
    assert info.value.code == "conflicting_update"
    assert info.value.field == "digest"
    assert s.updates == {A: D1}  # the first update stands


@pytest.mark.parametrize(("sent", "word"), [(2, "closed"), (0, "closed"), (4, "not open yet"),
                                            (100, "not open yet")])
def test_wrong_round(sent: int, word: str) -> None:
    s = state(round_=3)
    with pytest.raises(WrongRound) as info:
        s.submit(node_id=A, round_=sent, digest=D1)
    assert info.value.code == "wrong_round"
    assert info.value.field == "round"
    assert word in str(info.value)
    assert f"round {sent}" in str(info.value)
    assert "current round is 3" in str(info.value)
    assert s.updates == {}


def test_closed_round_refuses_new_nodes_but_answers_duplicates() -> None:
    s = state()
    s.submit(node_id=A, round_=3, digest=D1)
    s.closed = True
    with pytest.raises(WrongRound) as info:
        s.submit(node_id=B, round_=3, digest=D1)
    assert "closed" in str(info.value)
    assert B not in s.updates
    assert s.submit(node_id=A, round_=3, digest=D1) is Outcome.DUPLICATE
    assert s.check(node_id=A, round_=3, digest=D1) is Outcome.DUPLICATE
    with pytest.raises(ConflictingUpdate):
        s.submit(node_id=A, round_=3, digest=D2)
    with pytest.raises(WrongRound):
        s.submit(node_id=A, round_=2, digest=D1)
    assert s.updates == {A: D1}


def test_check_does_not_record() -> None:
    s = state(quorum=1)
    assert s.check(node_id=A, round_=3, digest=D1) is Outcome.ACCEPTED
    assert s.check(node_id=A, round_=3, digest=D1) is Outcome.ACCEPTED
    assert s.updates == {}
    assert s.decide(105.0, active=[A]) is Decision.WAIT
    s.submit(node_id=A, round_=3, digest=D1)
    assert s.check(node_id=A, round_=3, digest=D1) is Outcome.DUPLICATE
    with pytest.raises(ConflictingUpdate):
        s.check(node_id=A, round_=3, digest=D2)
    with pytest.raises(WrongRound):
        s.check(node_id=B, round_=4, digest=D1)
    assert s.updates == {A: D1}


def test_round_zero() -> None:
    s = state(round_=0, quorum=1)
    assert s.submit(node_id=A, round_=0, digest=D1) is Outcome.ACCEPTED
    with pytest.raises(WrongRound, match="not open yet"):
        s.check(node_id=B, round_=1, digest=D1)
    assert s.decide(100.0, active=[A]) is Decision.COMMIT
