"""The server's side of the `p2p` topology: the reduction phase of a round.

With `transport = "p2p"` a trainer keeps its update and sends a signed `Ready` (digest, no
payload). When the round would commit, the server does not aggregate: it sends the members a
`ShardPlan` (shared.p2p.make_plan: one shard per member, `p2p_replicas` owners each), the
members swap shards among themselves over direct data channels (native_node/mesh.py; a
`Shard` whose channel is not open goes through this server, forwarded like a Signal), and
each owner uploads its reduced shard here (encoded with `p2p_result_codec`, fp16 by
default). shared.p2p.ShardCheck compares the owners' results:

- all owners of a shard agree: the shard is settled;
- they disagree: another member is added as an owner (a revised plan goes to every member)
  and the majority wins; each owner that disagreed with it gets a `p2p_mismatch` rejection
  record (GET /api/rejections), the evidence the ledger slashes on;
- an owner or member leaves, or owners stay silent for `p2p_timeout_s`: they are dropped from
  the plan (their update is left out), their shards go to the next members, and the members
  resend only what the new owners lack. Below quorum the round is retried.

The settled shards make the aggregate the round commits; the server checks nothing it did
not compute from the owners' uploads. Server bytes per round: the owners' uploads (replicas
x the update size, in the result codec) plus small signed control messages, whatever the
number of peers; and the next RoundOpen to each member carries only the outer step to apply
(shared.downlink), since every member holds the aggregate, the previous params and (sent
once) the outer momentum.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from server.config import RunConfig
from server.peers import Connection, Peer
from server.store import UpdateRow
from shared.errors import BadUpdate, UnknownNode
from shared.messages import SERVER, Ack, Message, Ready, Shard, ShardPlan
from shared.p2p import (
    MalformedResult,
    Plan,
    ShardCheck,
    make_plan,
    prefer_primaries,
    revise,
)
from shared.rounds import Outcome, RoundState

if TYPE_CHECKING:
    from server.runstate import RunState

log = logging.getLogger("server.p2p")


class P2PMixin:
    """Mixed into server.coordinator.Coordinator, whose state it reads."""

    run: RunState
    config: RunConfig
    state: RoundState | None
    peers: dict[str, Peer]
    counters: Counter[str]
    _updates: dict[str, tuple[Any, UpdateRow]]
    _wake: asyncio.Event
    _p2p: tuple[Plan, ShardCheck] | None
    _p2p_event: asyncio.Event
    _p2p_members: frozenset[str]  # members of the last settled reduction (they hold it)
    _p2p_liars: set[str]  # owners outvoted in this server's lifetime: never primaries again

    async def send(self, conn: Connection, msg: Message | bytes) -> None: ...
    def _record(self, round: int | None, node_id: str, digest: str | None, code: str,
                reason: str, validators: list[str]) -> None: ...

    def _conn(self, node_id: str) -> Connection | None:
        p = self.peers.get(node_id)
        return Connection(ws=p.ws, remote="", peer=p) if p is not None and p.ws else None

    async def _on_ready(self, conn: Connection, msg: Ready) -> None:
        peer = conn.peer
        assert peer is not None
        state = self.state
        if self.config.transport != "p2p":
            raise BadUpdate("Ready is for transport p2p; submit the update", field="msg_type")
        if state is None:
            raise BadUpdate("no round is open", field="round")
        if peer.role != "trainer":
            raise BadUpdate(f"a {peer.role} does not submit updates", field="node_id")
        if msg.length != self.run.n_params:
            raise BadUpdate(f"wrong shape: update has {msg.length} values, the model has "
                            f"{self.run.n_params}", field="length")
        if self._p2p is not None:
            raise BadUpdate("the round is being reduced; it takes no more updates",
                            field="round")
        outcome = state.check(node_id=peer.node_id, round=msg.round, digest=msg.digest)
        if outcome is Outcome.ACCEPTED:
            state.submit(node_id=peer.node_id, round=msg.round, digest=msg.digest)
            self._updates[peer.node_id] = (None, UpdateRow(
                node_id=peer.node_id, digest=msg.digest, bytes=4 * msg.length,
                train_loss=msg.train_loss, samples=msg.samples, compute_s=msg.compute_s))
            peer.accepted += 1
            peer.state = "submitted"
            self.counters["accepted"] += 1
        else:
            self.counters["duplicates"] += 1
        await self.send(conn, Ack(round=msg.round, digest=msg.digest, status=outcome.value))
        self._wake.set()

    async def _on_shard(self, conn: Connection, msg: Shard) -> None:
        peer = conn.peer
        assert peer is not None
        if msg.node_id != peer.node_id:
            raise BadUpdate("a Shard's node_id must be its sender's", field="node_id")
        if msg.to != SERVER:  # relayed: the two nodes have no open data channel
            target = self._conn(msg.to)
            if target is None:
                raise UnknownNode(f"shard target {msg.to[:12]} is not connected", field="to")
            self.counters["p2p_relayed_bytes"] += len(msg.payload)
            peer.relayed_bytes += len(msg.payload)
            if peer.transport != "p2p-relayed":
                peer.transport = "p2p-relayed"
                log.info("relaying shards from %s to %s (no direct channel)", peer.node_id[:12],
                         msg.to[:12])
            fwd = Shard(run_id=msg.run_id, round=msg.round, node_id=msg.node_id, to=msg.to,
                        kind=msg.kind, shard=msg.shard, revision=msg.revision,
                        payload=msg.payload)
            await self.send(target, fwd)
            return
        red = self._p2p
        state = self.state
        if red is None or state is None or msg.round != state.round:
            raise BadUpdate("no reduction is running for that round", field="round")
        plan, check = red
        if msg.kind != "result":
            raise BadUpdate("the server takes reduced shards only", field="kind")
        if msg.revision < check.members_revision or msg.revision > plan.revision:
            self.counters["p2p_old_revision"] += 1
            return  # reduced over another member set; the owner sends again for this one
        try:
            events = check.on_result(peer.node_id, msg.shard, msg.payload)
        except MalformedResult as exc:
            self.counters["p2p_malformed"] += 1
            await self._act(state.round, plan, check, check.bad_events)
            raise BadUpdate(str(exc), field="payload") from None
        except ValueError as exc:
            raise BadUpdate(str(exc), field="shard") from None
        await self._act(state.round, plan, check, events)

    async def _act(self, round: int, plan: Plan, check: ShardCheck,
                   events: list[dict[str, Any]]) -> None:
        extra = self._judge(round, events)
        if extra:
            self.counters["p2p_disputes"] += len(extra)
            await self._replan(revise(plan, extra=extra), check)
        self._p2p_event.set()

    def _judge(self, round: int, events: list[dict[str, Any]]) -> dict[int, str]:
        """Act on ShardCheck's findings: record liars (never primaries again), log shards
        without a majority; returns the extra owners it asks for (shard -> member)."""
        extra: dict[int, str] = {}
        for e in events:
            if e["kind"] == "extra_owner":
                extra[e["shard"]] = e["node"]
            elif e["kind"] == "liar":
                self.counters["p2p_liars"] += 1
                self._p2p_liars.add(e["node"])
                log.warning("round %d: %s's reduction of shard %d disagrees with the majority",
                            round, e["node"][:12], e["shard"])
                self._record(round, e["node"], None, "p2p_mismatch",
                             f"reduced shard {e['shard']} differs from the other owners'",
                             ["server"])
            elif e["kind"] == "unresolved":
                log.error("round %d: shard %d has no majority among all members", round,
                          e["shard"])
        return extra

    async def _replan(self, plan: Plan, check: ShardCheck) -> None:
        """Adopt and send a revised plan (with any extra owners its own check asks for)."""
        while extra := self._judge(plan.round, check.revise(plan)):
            plan = revise(plan, extra=extra)
        self._p2p = (plan, check)
        await self._send_plan(plan)

    async def _send_plan(self, plan: Plan) -> None:
        msg = ShardPlan(run_id=self.run.run_id, round=plan.round, plan=plan.to_dict(),
                        rule=self.config.aggregator,
                        byzantine_fraction=self.config.byzantine_fraction,
                        result_codec=self.config.p2p_result_codec)
        for m in plan.members:
            conn = self._conn(m)
            if conn is not None:
                await self.send(conn, msg)

    async def _reduce_p2p(self) -> np.ndarray | None:
        """Run the reduction of the open round; its aggregate, or None when fewer than
        `quorum` members are left (the caller retries the round)."""
        state = self.state
        assert state is not None
        loop = asyncio.get_running_loop()
        plan = prefer_primaries(make_plan(state.round, state.updates, self.run.n_params,
                                          replicas=self.config.p2p_replicas),
                                self._p2p_liars)
        check = ShardCheck(plan, result_codec=self.config.p2p_result_codec)
        self._p2p = (plan, check)
        self._p2p_event.clear()
        log.info("round %d: p2p reduction over %d members, %d owners per shard", state.round,
                 len(plan.members), len(plan.owners[0]))
        await self._send_plan(plan)
        progress = loop.time()
        settled = 0
        try:
            while True:
                plan, check = self._p2p
                if check.done:
                    self._p2p_members = frozenset(plan.members)
                    return np.asarray(check.aggregate(), dtype=np.float32)
                if len(check.agreed) > settled:
                    settled, progress = len(check.agreed), loop.time()
                gone = {m for m in plan.members if self._conn(m) is None}
                if loop.time() - progress > self.config.p2p_timeout_s:
                    silent = {o for s, own in enumerate(plan.owners) if s not in check.agreed
                              for o in own if o not in check.results.get(s, {})}
                    log.warning("round %d: owners silent for %.0f s: %s", state.round,
                                self.config.p2p_timeout_s, [o[:12] for o in sorted(silent)])
                    gone |= silent
                    progress = loop.time()
                if gone:
                    self.counters["p2p_dropped"] += len(gone)
                    for m in gone:  # their updates leave the round
                        state.updates.pop(m, None)
                        self._updates.pop(m, None)
                    left = [m for m in plan.members if m not in gone]
                    if len(left) < self.config.quorum:
                        log.warning("round %d: %d members left, below quorum %d; retrying",
                                    state.round, len(left), self.config.quorum)
                        return None
                    log.info("round %d: dropping %s from the reduction; shards reassigned",
                             state.round, [g[:12] for g in sorted(gone)])
                    await self._replan(revise(plan, gone=gone), check)
                    continue
                self._p2p_event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._p2p_event.wait(), timeout=0.5)
        finally:
            self._p2p = None
