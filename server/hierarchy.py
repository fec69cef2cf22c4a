"""The server's side of hierarchical aggregation (`transport = "p2p"`, `p2p_groups = G > 0`).

Trainers keep their update and send `Ready`, as in p2p. When the round would commit the
server splits the members into at most G groups (shared.hierarchy.make_groups: by the region
label each node reports, then node id) and elects two aggregators per group
(shared.hierarchy.elect: capable native members, rotated by round, members outvoted before
last). Each member gets its group's plan only (a `ShardPlan` whose plan is a one-shard
shared.p2p.Plan owned by the aggregators, plus every member's Ready digest), sends its update
to both aggregators over a data channel (native_node/group.py; relayed through this server
only when no channel opens), and each aggregator applies the run's rule over the group and
uploads the encoded group result. Per group, shared.p2p.ShardCheck compares the two uploads:

- they agree: the group is settled;
- they differ: a third capable member aggregates the group too (a revised plan to the
  group) and the majority stands; the outvoted aggregator gets a `hierarchy_mismatch`
  rejection record (GET /api/rejections), is counted (`hierarchy_liars`) and is never
  elected first again by this server; a group with no majority left is dropped from the
  round (its members' updates are left out);
- an aggregator or member leaves, or aggregators stay silent for `p2p_timeout_s`: they are
  dropped from the group (shared.p2p.revise: the next member aggregates), members resend
  only to new aggregators. An aggregator still lacking updates at half that time reports
  whose (a `Shard` "part" to the server listing their ids); at the timeout a member every
  other aggregator reported missing is dropped too (so a hung aggregator, which sends its
  partner nothing, does not take the whole group down), while an aggregator that reported
  is not silent. Below quorum the round is retried.

The server then combines the settled group results with the run's rule
(shared.hierarchy.combine: `mean` weighs groups by size, so it equals the flat mean), rounds
the combination through the result codec, and sends it (a `Shard` from the server) to each
group's aggregators, which forward it to their members. The next RoundOpen to those members
carries only the outer step, which each checks against the params digest. Server bytes per
round: two group results up and two aggregates down per group, plus small signed control
frames per member (Ready, the group plan, the outer step, the commit notice). A Ready gets
no Ack: the group plan, signed once per group, lists every digest the server accepted, so
the server signs per group, not per member (a refused Ready still gets its typed Error).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from server.evidence import Evidence
from server.p2p import P2PReduction
from server.peers import Connection, Nodes
from shared.errors import BadUpdate
from shared.hierarchy import (
    Member,
    accused,
    combine,
    decode_missing,
    elect,
    make_groups,
    next_aggregator,
    plan_dict,
    region_of,
)
from shared.messages import SERVER, Shard, ShardPlan
from shared.p2p import MalformedResult, Plan, ShardCheck, decode_result, encode_result, revise
from shared.rounds import RoundState

if TYPE_CHECKING:
    from server.collection import RoundCollection
    from server.runstate import RunState

log = logging.getLogger("server.hierarchy")


@dataclass(eq=False)
class GroupRun:
    """One group's reduction in the open round."""

    index: int
    plan: Plan
    check: ShardCheck
    capable: list[str]
    progress: float  # loop time of the last change
    dropped: bool = False
    sent_plans: dict[int, bytes] = field(default_factory=dict)  # revision -> signed frame
    missing: dict[str, set[str]] = field(default_factory=dict)  # aggregator -> updates lacked

    @property
    def settled(self) -> bool:
        return self.dropped or self.check.done


class HierarchyReduction(P2PReduction):
    """Groups reduce at two elected aggregators each; the server combines group results."""

    # no signed Ack per Ready: each group's plan, signed once, lists the digests it accepted
    # (a refused Ready still gets its typed Error)
    acks_updates = False

    def __init__(self, run: RunState, nodes: Nodes, evidence: Evidence,
                 counters: Counter[str]) -> None:
        super().__init__(run, nodes, evidence, counters)
        self._groups: list[GroupRun] | None = None
        self._round = -1
        self._digests: dict[str, str] = {}
        self.last_groups: list[list[str]] = []  # the last reduction's groups (for /api, tests)

    @property
    def busy(self) -> bool:
        return self._groups is not None

    async def on_shard(self, conn: Connection, msg: Shard) -> None:
        if msg.to != SERVER:  # traffic between two nodes with no open channel: forwarded
            await super().on_shard(conn, msg)
            return
        peer = conn.peer
        assert peer is not None
        if msg.node_id != peer.node_id:
            raise BadUpdate("a Shard's node_id must be its sender's", field="node_id")
        groups = self._groups
        if groups is None or msg.round != self._round:
            raise BadUpdate("no reduction is running for that round", field="round")
        if not 0 <= msg.shard < len(groups):
            raise BadUpdate("no such group", field="shard")
        grp = groups[msg.shard]
        if grp.dropped:
            return
        if msg.revision < grp.check.members_revision or msg.revision > grp.plan.revision:
            self.counters["hierarchy_old_revision"] += 1
            return
        if msg.kind == "part":  # an aggregator's report of the updates it still lacks
            if peer.node_id not in grp.plan.owners[0]:
                raise BadUpdate("only the group's aggregators report missing updates",
                                field="kind")
            try:
                grp.missing[peer.node_id] = decode_missing(msg.payload, grp.plan.members)
            except ValueError as exc:
                raise BadUpdate(str(exc), field="payload") from None
            log.info("round %d: group %d: %s lacks the updates of %s", grp.plan.round,
                     grp.index, peer.node_id[:12],
                     [m[:12] for m in sorted(grp.missing[peer.node_id])])
            return
        try:
            events = grp.check.on_result(peer.node_id, 0, msg.payload)
        except MalformedResult as exc:
            self.counters["hierarchy_malformed"] += 1
            await self._act_group(grp, grp.check.bad_events)
            raise BadUpdate(str(exc), field="payload") from None
        except ValueError as exc:
            raise BadUpdate(str(exc), field="shard") from None
        await self._act_group(grp, events)

    async def _act_group(self, grp: GroupRun, events: list[dict[str, object]]) -> None:
        """Record liars; a disputed group gets a third aggregator, or is dropped."""
        loop = asyncio.get_running_loop()
        grp.progress = loop.time()
        for e in events:
            if e["kind"] == "liar":
                node = str(e["node"])
                self.counters["hierarchy_liars"] += 1
                self._liars.add(node)
                log.warning("round %d: %s's result for group %d disagrees with the majority",
                            grp.plan.round, node[:12], grp.index)
                self.evidence.record(grp.plan.round, node, None, "hierarchy_mismatch",
                                     f"group {grp.index} result differs from the other "
                                     "aggregators'", ["server"])
            elif e["kind"] in ("extra_owner", "unresolved"):
                extra = next_aggregator(grp.plan, grp.capable, sorted(self._liars))
                if extra is None:
                    log.error("round %d: group %d has no majority and no member left to "
                              "aggregate it: dropped", grp.plan.round, grp.index)
                    grp.dropped = True
                    continue
                self.counters["hierarchy_disputes"] += 1
                log.warning("round %d: group %d results differ; %s aggregates it too",
                            grp.plan.round, grp.index, extra[:12])
                await self._replan_group(grp, revise(grp.plan, extra={0: extra}))
        self._event.set()

    async def _replan_group(self, grp: GroupRun, plan: Plan) -> None:
        if plan.members != grp.plan.members:
            grp.missing.clear()  # reports were about the old member set
        grp.plan = plan
        grp.progress = asyncio.get_running_loop().time()  # the new aggregators get a full wait
        await self._act_group(grp, grp.check.revise(plan))
        await self._send_group_plan(grp)

    def _group_frame(self, grp: GroupRun) -> bytes:
        plan = grp.plan
        if plan.revision not in grp.sent_plans:
            assert self._groups is not None
            msg = ShardPlan(run_id=self.run.run_id, round=plan.round,
                            plan=plan_dict(plan, group=grp.index, n_groups=len(self._groups),
                                           digests=self._digests,
                                           report_s=self.config.p2p_timeout_s / 2),
                            rule=self.config.aggregator,
                            byzantine_fraction=self.config.byzantine_fraction,
                            result_codec=self.config.p2p_result_codec)
            grp.sent_plans[plan.revision] = self.nodes.frame(msg)
        return grp.sent_plans[plan.revision]

    async def _send_group_plan(self, grp: GroupRun) -> None:
        data = self._group_frame(grp)
        for m in grp.plan.members:
            conn = self.nodes.conn(m)
            if conn is not None:
                await self.nodes.send(conn, data)

    def _round_members(self, state: RoundState) -> list[Member]:
        out = []
        for n in sorted(state.updates):
            peer = self.nodes.peers.get(n)
            if peer is not None:
                out.append(Member(node_id=n, region=region_of(peer.features),
                                  capable=peer.runtime == "native"))
        return out

    def _drop_gone(self, grp: GroupRun, gone: set[str], collection: RoundCollection
                   ) -> Plan | None:
        """`gone` leave the group (and the round); the revised plan, or None when the group
        cannot go on (fewer than two members or capable members left)."""
        for m in gone:
            collection.drop(m)
        self.counters["p2p_dropped"] += len(gone)
        grp.capable = [c for c in grp.capable if c not in gone]
        left = [m for m in grp.plan.members if m not in gone]
        if len(left) < 2 or len(grp.capable) < 2:
            for m in left:
                collection.drop(m)
            grp.dropped = True
            log.warning("round %d: group %d is left with %d members: dropped from the round",
                        grp.plan.round, grp.index, len(left))
            return None
        return revise(grp.plan, gone=gone)

    async def reduce(self, state: RoundState, collection: RoundCollection) -> np.ndarray | None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        members = self._round_members(state)
        groups = make_groups(members, n_groups=cfg.p2p_groups)
        if not groups:
            log.warning("round %d: fewer than two native members: no group can aggregate",
                        state.round)
            return None
        self._round, self._digests = state.round, dict(state.updates)
        runs: list[GroupRun] = []
        for i, members_i in enumerate(groups):
            plan = elect(state.round, self.run.n_params, members_i, avoid=sorted(self._liars))
            runs.append(GroupRun(index=i, plan=plan, capable=[m.node_id for m in members_i
                                                               if m.capable],
                                 check=ShardCheck(plan, result_codec=cfg.p2p_result_codec),
                                 progress=loop.time()))
        self._groups = runs
        self.last_groups = [list(r.plan.members) for r in runs]
        self._event.clear()
        log.info("round %d: hierarchical reduction, %d members in %d groups (%s)", state.round,
                 len(members), len(runs), ", ".join(str(len(r.plan.members)) for r in runs))
        try:
            for grp in runs:
                await self._send_group_plan(grp)
            while not all(g.settled for g in runs):
                for grp in runs:
                    if grp.settled:
                        continue
                    gone = {m for m in grp.plan.members if self.nodes.conn(m) is None}
                    if loop.time() - grp.progress > cfg.p2p_timeout_s:
                        # silent: neither a result nor a report of missing updates; members
                        # every other aggregator lacks leave too (their update never came)
                        silent = {a for a in grp.plan.owners[0]
                                  if a not in grp.check.results.get(0, {})
                                  and a not in grp.missing}
                        lacking = accused(grp.plan.owners[0], grp.missing)
                        log.warning("round %d: group %d aggregators silent for %.0f s: %s; "
                                    "updates missing: %s", state.round, grp.index,
                                    cfg.p2p_timeout_s, [s[:12] for s in sorted(silent)],
                                    [m[:12] for m in sorted(lacking)])
                        gone |= silent | lacking
                        grp.progress = loop.time()
                    if gone:
                        log.info("round %d: dropping %s from group %d; aggregators replaced",
                                 state.round, [g[:12] for g in sorted(gone)], grp.index)
                        revised = self._drop_gone(grp, gone, collection)
                        if revised is not None:
                            await self._replan_group(grp, revised)
                left = sum(len(g.plan.members) for g in runs if not g.dropped)
                if left < cfg.quorum:
                    log.warning("round %d: %d members left, below quorum %d; retrying",
                                state.round, left, cfg.quorum)
                    return None
                self._event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._event.wait(), timeout=0.5)
            done = [g for g in runs if not g.dropped]
            if sum(len(g.plan.members) for g in done) < cfg.quorum or not done:
                return None
            return await self._combine(done)
        finally:
            self._groups = None

    async def _combine(self, done: list[GroupRun]) -> np.ndarray:
        """The groups' results combined, rounded through the result codec (what members get),
        and sent to each group's aggregators in the majority."""
        codec = self.config.p2p_result_codec
        n = self.run.n_params
        results = [np.asarray(decode_result(g.check.payloads[g.check.agreed[0]], n, codec),
                              dtype=np.float32) for g in done]
        sizes = [len(g.plan.members) for g in done]
        agg = combine(results, sizes, rule=self.config.aggregator,
                      byzantine_fraction=self.config.byzantine_fraction)
        payload = encode_result(agg, codec)
        out = np.asarray(decode_result(payload, n, codec), dtype=np.float32)
        holders: set[str] = set()
        for g in done:
            winners = [a for a, d in g.check.results.get(0, {}).items()
                       if d == g.check.agreed[0] and a in g.plan.owners[0]]
            for a in winners:
                conn = self.nodes.conn(a)
                if conn is None:
                    continue
                msg = Shard(run_id=self.run.run_id, round=g.plan.round, node_id=SERVER, to=a,
                            kind="result", shard=g.index, revision=g.plan.revision,
                            payload=payload)
                await self.nodes.send(conn, self.nodes.frame(msg))
            if winners:
                holders |= set(g.plan.members)
        self._members = frozenset(holders)  # they get only the outer step next round
        return out
