"""Overlapped rounds (run option overlap, shared.overlap): the merge is exact, the torch trainer
merges what arrives mid-way and after its steps, and the participant trains ahead only when
the run and the driver both do it."""

from __future__ import annotations

import dataclasses
import threading
from array import array

import numpy as np
import pytest

from ml.workload import initial_params, resolve
from native_node.trainer import Rebase, Trainer
from server.config import RunConfig
from shared.messages import Submit
from shared.overlap import Ahead, local_params, merge, pseudo_gradient
from shared.participant import Participant
from tests.test_participant import challenge, kinds, params, participant, round_open, sent, signed
from tests.test_participant import welcome as plain_welcome


def test_merge_is_new_global_plus_local_progress_in_float32() -> None:
    rng = np.random.default_rng(3)
    new, local, start = (rng.standard_normal(257).astype(np.float32) for _ in range(3))
    got = merge(new, local, start)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, new + (local - start))
    # the Pyodide kind (array('f')) gives the same float32 values
    plain = merge(array("f", new.tobytes()), array("f", local.tobytes()),
                  array("f", start.tobytes()))
    np.testing.assert_array_equal(np.frombuffer(plain, dtype=np.float32), got)
    np.testing.assert_array_equal(pseudo_gradient(new, got), new - got)
    np.testing.assert_array_equal(local_params(new, pseudo_gradient(new, got)), new - (new - got))


def _trainer() -> tuple[Trainer, np.ndarray]:
    work = resolve(model="mlp-digits", flavour=None, data=None, data_path=None,
                   partition="iid", alpha=0.5, seed=0)
    return Trainer(work, shard=0, n_shards=2, node_id="n0"), initial_params(work)


@pytest.mark.parametrize("merge_at", [2, 5])  # mid-way (between steps), and after the last one
def test_trainer_merges_steps_run_ahead_exactly(merge_at: int) -> None:
    trainer, theta0 = _trainer()
    trainer.train_round(theta0, steps=3, lr=1e-2, batch_size=16)  # round t
    start = trainer.params.flat().numpy().copy()  # theta_i^t: where the steps ahead begin
    new = theta0 + np.float32(0.01)  # theta_{t+1}, as the RoundOpen brings it
    rebase, seen = Rebase(), {}

    def progress(done: int, _loss: float) -> None:
        if done == merge_at:  # the RoundOpen arrives: the local params now are merged next
            seen["local"] = trainer.params.flat().numpy().copy()
            assert rebase.put(7, new)

    steps = 5
    result = trainer.train_round(None, steps=steps, lr=1e-2, batch_size=16, progress=progress,
                                 rebase=rebase)
    assert result.steps == steps
    assert rebase.merged
    assert rebase.round == 7
    final = trainer.params.flat().numpy()
    merged = merge(new, seen["local"], start)
    if merge_at == steps:  # merged at the end: the final params are the formula itself
        np.testing.assert_array_equal(final, merged)
    else:  # the update is against theta_{t+1}: theta_{t+1} - final, exactly
        assert not np.array_equal(final, merged)  # steps ran on after the merge
    np.testing.assert_array_equal(result.delta, pseudo_gradient(new, final))


def test_steps_done_before_the_round_opens_are_merged_after() -> None:
    trainer, theta0 = _trainer()
    trainer.train_round(theta0, steps=2, lr=1e-2, batch_size=16)
    start = trainer.params.flat().numpy().copy()
    rebase = Rebase()
    result = trainer.train_round(None, steps=3, lr=1e-2, batch_size=16, rebase=rebase)
    local = trainer.params.flat().numpy().copy()
    assert not rebase.merged
    np.testing.assert_array_equal(result.delta, start - local)  # against where they began
    new = theta0 - np.float32(0.02)
    assert not rebase.put(4, new)  # the thread is done: the driver merges after the fact
    late = rebase.take()
    assert late is not None
    delta = trainer.merge_after(late)
    final = merge(new, local, start)
    np.testing.assert_array_equal(trainer.params.flat().numpy(), final)
    np.testing.assert_array_equal(delta, pseudo_gradient(new, final))


def test_cancel_stops_steps_run_ahead() -> None:
    trainer, theta0 = _trainer()
    trainer.train_round(theta0, steps=1, lr=1e-2, batch_size=16)
    cancel = threading.Event()
    cancel.set()
    result = trainer.train_round(None, steps=4, lr=1e-2, batch_size=16, cancel=cancel,
                                 rebase=Rebase())
    assert result.steps == 0


# -- the participant: announced in the Welcome, done only where the driver can -------------------
def _joined(*, overlap: bool, supported: bool) -> Participant:
    p = participant()
    p.ahead.supported = supported
    assert kinds(p.receive(signed(challenge()))) == ["send"]
    w = dataclasses.replace(plain_welcome(), overlap=overlap)
    assert kinds(p.receive(signed(w))) == ["welcome"]
    return p


def test_participant_trains_ahead_and_the_next_round_open_merges() -> None:
    p = _joined(overlap=True, supported=True)
    theta0, theta1 = params(0), params(1)
    (train,) = p.receive(signed(round_open(0, theta0)))
    assert "merge" not in train
    delta = (theta0 * np.float32(0.1)).astype("<f4").tobytes()
    events = p.submit(0, delta, train_loss=1.0, samples=16, compute_s=0.5)
    assert kinds(events) == ["journal", "send", "train_ahead"]
    assert events[2]["after_round"] == 0
    first = sent(events[1])
    assert isinstance(first, Submit)
    assert first.round == 0
    (train1,) = p.receive(signed(round_open(1, theta1)))
    assert train1["merge"] is True
    assert train1["params_digest"] == round_open(1, theta1).params_digest
    assert p.ahead.merges == 1
    # the update of round 1 is an ordinary Submit, checked against round 1's params
    events = p.submit(1, delta, train_loss=0.9, samples=16, compute_s=0.5)
    second = sent(events[1])
    assert isinstance(second, Submit)
    assert second.round == 1
    assert p.pending_params == round_open(1, theta1).params_digest
    # a retry of round 0 (an older round) is not merged into the steps ahead of round 1
    assert p.ahead.after == 1
    assert not p.ahead.takes(1)


@pytest.mark.parametrize(("overlap", "supported"), [(False, True), (True, False)])
def test_no_steps_ahead_unless_the_run_and_the_driver_do_it(overlap: bool,
                                                            supported: bool) -> None:
    p = _joined(overlap=overlap, supported=supported)
    theta0 = params(0)
    p.receive(signed(round_open(0, theta0)))
    events = p.submit(0, theta0.astype("<f4").tobytes(), train_loss=1.0, samples=16,
                      compute_s=0.5)
    assert kinds(events) == ["journal", "send"]
    (train1,) = p.receive(signed(round_open(1, params(1))))
    assert "merge" not in train1


def test_ahead_forgets_on_a_run_without_the_option() -> None:
    a = Ahead(supported=True)
    a.on_welcome(True)
    a.after_submit(3)
    a.on_welcome(False)
    assert a.after is None
    assert not a.takes(4)


def test_config_overlap_is_off_by_default_and_refused_where_not_built() -> None:
    assert RunConfig().overlap is False
    assert RunConfig(overlap=True, transport="star").overlap
    for bad in ({"transport": "p2p"}, {"secagg": True}, {"autotune": True}):
        with pytest.raises(ValueError, match="overlap"):
            RunConfig(overlap=True, **bad)
