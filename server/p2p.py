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
  record (GET /api/rejections) and is slashed (`outvoted`, server.slashing: evidence
  `p2p_outvoted`, the owners' signed result frames and the server's signed plans, which the
  server keeps per revision for the running reduction);
- an owner or member leaves, or owners stay silent for `p2p_timeout_s`: they are dropped from
  the plan (their update is left out), their shards go to the next members, and the members
  resend only what the new owners lack. Below quorum the round is retried.

The settled shards make the aggregate the round commits; the server checks nothing it did
not compute from the owners' uploads. Server bytes per round: the owners' uploads (replicas
x the update size, in the result codec) plus small signed control messages, whatever the
number of peers; and the next RoundOpen to each member carries only the outer step to apply
(shared.downlink), since every member holds the aggregate, the previous params and (sent
once) the outer momentum.

`P2PReduction` is the p2p run's strategy (server.reduction.Reduction): the coordinator
collects the Readys (server.collection), then calls `reduce`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from server.evidence import Evidence
from server.peers import Connection, Nodes, Peer
from shared.errors import BadUpdate, UnknownNode
from shared.messages import SERVER, Hello, Ready, Shard, ShardPlan, Submit
from shared.p2p import (
    MalformedResult,
    Plan,
    ShardCheck,
    make_plan,
    prefer_primaries,
    revise,
)
from shared.rounds import RoundState

# (round, shard, outvoted owner, majority digest, owner -> digest, revision -> signed plan)
Outvoted = Callable[[int, int, str, str, dict[str, str], dict[int, bytes]], bool]

if TYPE_CHECKING:
    from server.collection import RoundCollection
    from server.runstate import RunState

log = logging.getLogger("server.p2p")


class P2PReduction:
    """The p2p topology's reduction strategy (server.reduction.Reduction)."""

    update_type: type[Submit] | type[Ready] = Ready
    wrong_update = "this run reduces peer to peer: send Ready, not the update"

    def __init__(self, run: RunState, nodes: Nodes, evidence: Evidence,
                 counters: Counter[str]) -> None:
        self.run, self.config, self.nodes = run, run.config, nodes
        self.evidence = evidence
        self.counters = counters  # p2p_* (disputes, liars, malformed, dropped, relayed bytes)
        self._p2p: tuple[Plan, ShardCheck] | None = None  # the running reduction
        self._event = asyncio.Event()  # a result came in, or the plan changed
        self._members: frozenset[str] = frozenset()  # of the last settled reduction (they hold it)
        self._liars: set[str] = set()  # owners outvoted in this server's lifetime: never primaries
        self._plans: dict[int, bytes] = {}  # revision -> the signed ShardPlan frame (this round)
        self.outvoted: Outvoted | None = None  # the coordinator wires server.slashing here
        # what the plan asks owners to do and how their results are checked (secure p2p
        # rounds, server.secagg_p2p, set a ring sum and its check here)
        self.rule, self.result_codec = self.config.aggregator, self.config.p2p_result_codec
        self.make_check: Callable[[Plan], ShardCheck] = lambda plan: ShardCheck(
            plan, result_codec=self.result_codec)
        self.ejected: set[str] = set()  # members proven to send bad input: dropped as gone

    @property
    def busy(self) -> bool:
        return self._p2p is not None

    def vector(self, msg: Submit | Ready) -> None:
        return None  # the update stays with its node

    def on_join(self, hello: Hello) -> str:
        # native nodes and browser tabs alike (browser/node/p2p_glue.py, mesh.js); in grouped
        # runs a tab is a plain member, never an aggregator (shared.hierarchy.elect)
        # "p2p-relayed" once the server forwards shards for it
        if self.config.stream_chunk > 0 and hello.runtime == "browser":
            raise BadUpdate("this p2p run streams its shards in pieces of stream_chunk_mb "
                              "(acknowledged, resumed: native_node/p2p_send.py), which tabs "
                              "do not do yet; join it with a native node", field="runtime")
        return "p2p" if hello.role == "trainer" else "ws"

    def open_kind(self, peer: Peer, holds_prev: bool) -> str | None:
        """A member of the last reduction holds the aggregate, the previous params and the
        momentum: it gets the outer step only; any other trainer, params + momentum."""
        if peer.role != "trainer":
            return None
        if (holds_prev and peer.has_momentum and peer.node_id in self._members
                and self.run.prev_digest is not None):
            return "outer"
        return "full+m"

    async def on_shard(self, conn: Connection, msg: Shard) -> None:
        peer = conn.peer
        assert peer is not None
        if msg.node_id != peer.node_id:
            raise BadUpdate("a Shard's node_id must be its sender's", field="node_id")
        if len(msg.payload) > self.counters["p2p_shard_max_bytes"]:  # streamed runs: <= chunk
            self.counters["p2p_shard_max_bytes"] = len(msg.payload)
        if msg.to != SERVER:  # relayed: the two nodes have no open data channel
            target = self.nodes.conn(msg.to)
            if target is None:
                raise UnknownNode(f"shard target {msg.to[:12]} is not connected", field="to")
            self.counters["p2p_relayed_bytes"] += len(msg.payload)
            peer.relayed_bytes += len(msg.payload)
            peer.ice_pairs[msg.to] = "server"
            if peer.transport != "p2p-relayed":
                peer.transport = "p2p-relayed"
                log.info("relaying shards from %s to %s (no direct channel)", peer.node_id[:12],
                         msg.to[:12])
            fwd = Shard(run_id=msg.run_id, round=msg.round, node_id=msg.node_id, to=msg.to,
                        kind=msg.kind, shard=msg.shard, revision=msg.revision,
                        payload=msg.payload)
            await self.nodes.send(target, fwd)
            return
        red = self._p2p
        if red is None or msg.round != red[0].round:
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
            await self._act(plan, check, check.bad_events)
            raise BadUpdate(str(exc), field="payload") from None
        except ValueError as exc:
            raise BadUpdate(str(exc), field="shard") from None
        await self._act(plan, check, events)

    async def _act(self, plan: Plan, check: ShardCheck, events: list[dict[str, Any]]) -> None:
        extra = self._judge(check, events)
        if extra:
            self.counters["p2p_disputes"] += len(extra)
            await self._replan(revise(plan, extra=extra), check)
        self._event.set()

    def _judge(self, check: ShardCheck, events: list[dict[str, Any]]) -> dict[int, str]:
        """Act on ShardCheck's findings: record and slash liars (never primaries again), log
        shards without a majority; returns the extra owners it asks for (shard -> member)."""
        extra: dict[int, str] = {}
        round_ = check.plan.round
        for e in events:
            if e["kind"] == "extra_owner":
                extra[e["shard"]] = e["node"]
            elif e["kind"] == "liar":
                self.counters["p2p_liars"] += 1
                self._liars.add(e["node"])
                log.warning("round %d: %s's reduction of shard %d disagrees with the majority",
                            round_, e["node"][:12], e["shard"])
                self.evidence.record(round_, e["node"], None, "p2p_mismatch",
                                     f"reduced shard {e['shard']} differs from the other "
                                     "owners'", ["server"])
                self._slash(check, e["node"], e["shard"])
            elif e["kind"] == "unresolved":
                log.error("round %d: shard %d has no majority among all members", round_,
                          e["shard"])
        return extra

    def _slash(self, check: ShardCheck, node: str, shard: int) -> None:
        """Hand an outvoted owner to slashing with what its evidence needs: every counted
        owner's digest, the majority's, and the signed plans up to the judging one."""
        if self.outvoted is None:
            return
        plan = check.plan
        self._plan_frame(plan)  # the plan that judged is signed (and sent right after)
        owners = {o: d for o, d in check.results.get(shard, {}).items()
                  if o in plan.owners[shard]}
        plans = {r: f for r, f in self._plans.items() if r <= plan.revision}
        if not self.outvoted(plan.round, shard, node, check.agreed[shard], owners, plans):
            log.warning("round %d: %s outvoted on shard %d, but its evidence is incomplete: "
                        "not slashed", plan.round, node[:12], shard)

    async def _replan(self, plan: Plan, check: ShardCheck) -> None:
        """Adopt and send a revised plan (with any extra owners its own check asks for)."""
        while extra := self._judge(check, check.revise(plan)):
            plan = revise(plan, extra=extra)
        self._p2p = (plan, check)
        await self._send_plan(plan)

    def _plan_frame(self, plan: Plan) -> bytes:
        """The signed ShardPlan of `plan` (one frame per revision, kept for the evidence)."""
        if plan.revision not in self._plans:
            msg = ShardPlan(run_id=self.run.run_id, round=plan.round, plan=plan.to_dict(),
                            rule=self.rule, byzantine_fraction=self.config.byzantine_fraction,
                            result_codec=self.result_codec)
            self._plans[plan.revision] = self.nodes.frame(msg)
        return self._plans[plan.revision]

    async def _send_plan(self, plan: Plan) -> None:
        data = self._plan_frame(plan)
        for m in plan.members:
            conn = self.nodes.conn(m)
            if conn is not None:
                await self.nodes.send(conn, data)

    async def reduce(self, state: RoundState, collection: RoundCollection) -> np.ndarray | None:
        """Run the reduction of the open round; its aggregate, or None when fewer than
        `quorum` members are left (the caller retries the round)."""
        loop = asyncio.get_running_loop()
        plan = prefer_primaries(make_plan(state.round, state.updates, self.run.n_params,
                                          replicas=self.config.p2p_replicas,
                                          max_shard=self.config.stream_chunk // 4),
                                self._liars)  # streamed: no shard over a chunk (p2p_stream)
        check = self.make_check(plan)
        self._p2p = (plan, check)
        self._plans = {}
        self.ejected = set()
        self._event.clear()
        log.info("round %d: p2p reduction over %d members, %d owners per shard", state.round,
                 len(plan.members), len(plan.owners[0]))
        await self._send_plan(plan)
        progress = loop.time()
        settled = 0
        try:
            while True:
                plan, check = self._p2p
                if check.done:
                    self._members = frozenset(plan.members)
                    return np.asarray(check.aggregate(), dtype=np.float32)
                if len(check.agreed) > settled:
                    settled, progress = len(check.agreed), loop.time()
                gone = {m for m in plan.members if self.nodes.conn(m) is None
                        or m in self.ejected}
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
                        collection.drop(m)
                    left = [m for m in plan.members if m not in gone]
                    if len(left) < self.config.quorum:
                        log.warning("round %d: %d members left, below quorum %d; retrying",
                                    state.round, len(left), self.config.quorum)
                        return None
                    log.info("round %d: dropping %s from the reduction; shards reassigned",
                             state.round, [g[:12] for g in sorted(gone)])
                    await self._replan(revise(plan, gone=gone), check)
                    continue
                self._event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._event.wait(), timeout=0.5)
        finally:
            self._p2p = None
