"""Overlapped rounds (run option overlap, shared.overlap): the merge is exact, the torch trainer
merges what arrives mid-way and after its steps, and the participant trains ahead only when
the run and the driver both do it."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml.workload import initial_params, resolve
from native_node.trainer import Rebase, Trainer
from server.config import RunConfig
from shared.codecs import decode_update
from shared.messages import RoundOpen, Submit
from shared.overlap import Ahead, local_params, merge, pseudo_gradient
from shared.participant import Participant
from tests.test_participant import (
    RUN,
    challenge,
    kinds,
    params,
    participant,
    round_open,
    sent,
    signed,
)
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


# -- the native node's choreography: steps ahead, then the RoundOpen (no network) ----------------
async def _settle(client: Any) -> None:
    for _ in range(3000):  # the trainer runs in a thread; its task finishes on this loop
        if client.task is None or client.task.done():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the node's training task did not finish")


@pytest.mark.parametrize("merge_mid_way", [False, True])
async def test_native_node_trains_ahead_and_submits_against_the_new_round(
        tmp_path: Path, merge_mid_way: bool) -> None:
    from native_node.client import NodeClient, NodeOptions
    from tests.test_participant import digest, key

    trainer, theta0 = _trainer()
    n = len(theta0)
    client = NodeClient(NodeOptions(coordinator="127.0.0.1:1", identity=key("node"),
                                    state_dir=tmp_path, progress=False))
    client.trainer = trainer
    for frame in (challenge(), dataclasses.replace(plain_welcome(n_params=n), overlap=True)):
        client.part.receive(signed(frame))  # (the Welcome's toy model is not built here)

    def open_(rnd: int, theta: np.ndarray, steps: int) -> RoundOpen:
        return RoundOpen(run_id=RUN, round=rnd, attempt=0, params_digest=digest(theta),
                         deadline_s=30.0, inner_steps=steps, inner_lr=1e-2, batch_size=16,
                         payload=theta.astype("<f4").tobytes())

    steps = 80 if merge_mid_way else 3
    for ev in client.part.receive(signed(open_(0, theta0, steps))):  # steps ahead: as many
        await client.on_event(ev)
    for _ in range(1500):  # round 0 trained and submitted; the steps of round 1 run ahead
        if client.rebase is not None or (client.task is not None and client.task.done()):
            break
        await asyncio.sleep(0.02)
    assert client.task is not None
    if client.task.done():
        client.task.result()  # (raises what the training task raised)
    assert client.part.pending is not None
    assert client.part.pending.round == 0
    rebase = client.rebase
    assert rebase is not None
    if merge_mid_way:
        assert not rebase.closed  # 80 steps: round 1 opens while they run
    else:
        await _settle(client)
        assert client.ahead_done is not None  # done before round 1 opened: it waits
    theta1 = theta0 + np.float32(0.003)
    for ev in client.part.receive(signed(open_(1, theta1, steps))):
        assert ev.get("merge") is True
        await client.on_event(ev)
    if merge_mid_way:  # the round's params reach the running steps, merged between two
        for _ in range(3000):
            if rebase.merged:
                break
            await asyncio.sleep(0.02)
        assert rebase.merged
        assert rebase.merged_between  # (not after the last step; the steps may end since)
    await _settle(client)
    pending = client.part.pending
    assert isinstance(pending, Submit)  # (not spooled: the run does not stream)
    assert pending.round == 1
    assert client.part.pending_params == digest(theta1)
    delta = decode_update(pending.payload, n, expect="raw32")  # the pseudo-gradient itself
    # round 2's steps now run ahead from where round 1 ended: their base is round 1's final
    assert client.part.ahead.after == 1
    final = trainer.params.theta.numpy().copy()
    np.testing.assert_array_equal(delta, pseudo_gradient(theta1, final))
    assert client.part.ahead.merges == 1
    client.cancel.set()
    await _settle(client)
