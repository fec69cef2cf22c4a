"""Streamed p2p reductions, sans I/O (shared/p2p_stream.py): shards no larger than a chunk,
pieces checked on arrival with typed refusals that change nothing, pieces dropped once their
shard is reduced and acknowledged with their digest, and the same aggregate as one frame."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import pytest

from shared.errors import BadChunk, DuplicateChunk, ForeignChunk
from shared.p2p import ShardReducer, make_plan, revise
from shared.p2p_stream import ACK, ack_again, check_ack

MEMBERS = tuple(f"{c}" * 64 for c in "abc")
N = 1000
CHUNK_FLOATS = 64  # 256-byte pieces: 16 shards over 3 members


def updates(n: int = N) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {m: rng.standard_normal(n).astype(np.float32) for m in MEMBERS}


def exchange(reducers: dict[str, ShardReducer], events: list[tuple[str, dict[str, Any]]],
             *, shuffle: int | None = None) -> dict[str, Any]:
    """Deliver every event (sender, event) until none is left; returns what was seen."""
    seen: dict[str, Any] = {"acks": 0, "results_to_server": 0}
    rng = random.Random(shuffle)
    while events:
        i = rng.randrange(len(events)) if shuffle is not None else 0
        sender, e = events.pop(i)
        if e["to"] == "server":
            seen["results_to_server"] += 1
            continue
        r = reducers[e["to"]]
        if e["kind"] == "part":
            out = r.on_part(sender, e["shard"], bytes(e["payload"]))
        elif e["kind"] == ACK:
            seen["acks"] += 1
            check_ack(r, sender, e["shard"], e["payload"])
            out = []
        else:
            out = r.on_result(e["shard"], e["payload"])
        events += [(e["to"], x) for x in out]
    return seen


def start(plan: Any, ups: dict[str, np.ndarray], *, stream: bool
          ) -> tuple[dict[str, ShardReducer], list[tuple[str, dict[str, Any]]]]:
    reducers = {m: ShardReducer(m, plan, ups[m], rule="median", result_codec="raw32",
                                stream=stream) for m in plan.members}
    return reducers, [(m, e) for m, r in reducers.items() for e in r.start()]


def test_a_streamed_plan_has_more_shards_than_members_none_over_a_chunk() -> None:
    plan = make_plan(0, MEMBERS, N, replicas=2, max_shard=CHUNK_FLOATS)
    assert plan.n_shards == -(-N // CHUNK_FLOATS) == 16
    assert all(hi - lo <= CHUNK_FLOATS for lo, hi in map(plan.bounds, range(plan.n_shards)))
    assert plan.owners[4] == (MEMBERS[1], MEMBERS[2])  # dealt round the ring
    assert make_plan(0, MEMBERS, 10, max_shard=64).n_shards == 3  # never fewer than members
    assert make_plan(0, MEMBERS, N).n_shards == 3  # off: one shard per member


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_streamed_pieces_reduce_to_the_one_frame_aggregate_and_are_dropped(seed: int) -> None:
    ups = updates()
    one, ev1 = start(make_plan(0, MEMBERS, N, replicas=2), ups, stream=False)
    exchange(one, ev1)
    plan = make_plan(0, MEMBERS, N, replicas=2, max_shard=CHUNK_FLOATS)
    reds, events = start(plan, ups, stream=True)
    seen = exchange(reds, events, shuffle=seed)
    want = one[MEMBERS[0]].aggregate()
    for r in reds.values():
        assert r.done
        assert np.array_equal(r.aggregate(), want)
        assert r.parts == {}  # every piece dropped once its shard was reduced
        assert r.held_bytes == 0
        # never more than the others' pieces of the shards it owns (2/3 of 16 shards)
        assert 0 < r.peak_held_bytes <= 2 * 4 * sum(
            hi - lo for lo, hi in map(plan.bounds, plan.owned_by(r.me)))
    # one receipt per piece sent to another owner: 16 shards x 2 owners x 2 other members
    assert seen["acks"] == 16 * 2 * 2
    assert seen["results_to_server"] == 16 * 2


def test_bad_pieces_get_typed_refusals_and_touch_nothing() -> None:
    ups = updates()
    plan = make_plan(0, MEMBERS, N, replicas=2, max_shard=CHUNK_FLOATS)
    a, b, c = MEMBERS
    r = ShardReducer(a, plan, ups[a], rule="mean", stream=True)
    r.start()
    mine = [s for s in plan.owned_by(a) if plan.owners[s][0] == a]
    s = mine[0]
    lo, hi = plan.bounds(s)
    good = ups[b][lo:hi].tobytes()
    r.on_part(b, s, good)
    before = ({k: dict(v) for k, v in r.parts.items()}, dict(r.reduced), r.held_bytes)
    not_mine = next(x for x in range(plan.n_shards) if a not in plan.owners[x])
    bad: list[tuple[type[Exception], str, int, bytes]] = [
        (DuplicateChunk, b, s, good),
        (ForeignChunk, "d" * 64, s, good),  # not a member
        (ForeignChunk, b, not_mine, good),  # a shard this peer does not own
        (ForeignChunk, b, plan.n_shards, good),  # out of range
        (BadChunk, c, s, good[:-4]),  # wrong size
        (BadChunk, c, s, np.full(hi - lo, np.nan, np.float32).tobytes()),  # not finite
    ]
    for exc, sender, shard, payload in bad:
        with pytest.raises(exc):
            r.on_part(sender, shard, payload)
        assert ({k: dict(v) for k, v in r.parts.items()}, dict(r.reduced),
                r.held_bytes) == before
    # the last piece completes the shard: reduced, pieces dropped, both senders acknowledged
    out = r.on_part(c, s, ups[c][lo:hi].tobytes())
    acks = {e["to"]: e["payload"] for e in out if e["kind"] == ACK}
    assert acks == {b: hashlib.sha256(good).digest(),
                    c: hashlib.sha256(ups[c][lo:hi].tobytes()).digest()}
    assert s in r.reduced
    assert s not in r.parts
    with pytest.raises(DuplicateChunk):  # resent after a lost channel: refused, acked again
        r.on_part(b, s, good)
    assert ack_again(r, b, s, good) == [{"kind": ACK, "to": b, "shard": s,
                                         "payload": hashlib.sha256(good).digest()}]


def test_a_receipt_must_come_from_an_owner_and_name_our_piece() -> None:
    ups = updates()
    plan = make_plan(0, MEMBERS, N, replicas=2, max_shard=CHUNK_FLOATS)
    a = MEMBERS[0]
    r = ShardReducer(a, plan, ups[a], rule="mean", stream=True)
    s = next(x for x in range(plan.n_shards) if a not in plan.owners[x])
    lo, hi = plan.bounds(s)
    owner = plan.owners[s][0]
    check_ack(r, owner, s, hashlib.sha256(ups[a][lo:hi].tobytes()).digest())
    with pytest.raises(BadChunk):
        check_ack(r, owner, s, hashlib.sha256(b"another piece").digest())
    with pytest.raises(ForeignChunk):
        check_ack(r, a, s, hashlib.sha256(ups[a][lo:hi].tobytes()).digest())


def test_members_leaving_mid_stream_resend_everything_and_the_rest_agree() -> None:
    ups = updates()
    plan = make_plan(0, MEMBERS, N, replicas=2, max_shard=CHUNK_FLOATS)
    reds, events = start(plan, ups, stream=True)
    half = events[: len(events) // 2]  # the exchange stops half way; then c leaves
    exchange(reds, half, shuffle=5)
    new = revise(plan, gone=[MEMBERS[2]])
    left = {m: reds[m] for m in new.members}
    resent = [(m, e) for m, r in left.items() for e in r.revise(new)]
    exchange(left, resent, shuffle=6)
    ref, ev = start(make_plan(0, new.members, N, replicas=2, max_shard=CHUNK_FLOATS),
                    {m: ups[m] for m in new.members}, stream=False)
    exchange(ref, ev)
    for r in left.values():
        assert r.done
        assert np.array_equal(r.aggregate(), ref[new.members[0]].aggregate())
