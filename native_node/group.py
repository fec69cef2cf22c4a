"""A trainer's side of hierarchical aggregation (server/hierarchy.py has the server's).

In a `p2p` run with `p2p_groups > 0` the round's `ShardPlan` is a group plan
(shared.hierarchy.is_group_plan): this node's group, its two aggregators and every member's
Ready digest. The node runs shared.hierarchy.GroupReducer: its update goes to both aggregators
over the data channels of the p2p role's mesh (native_node/mesh.py; through the server when a
channel does not open), an aggregator reduces the group and uploads the result, receives the
server's combined aggregate (a `Shard` from the server) and forwards it to the members. Each
member ends the round holding the combined aggregate, so the next RoundOpen carries only the
outer step, which native_node/p2p.py's `params` applies and checks against the params digest.

`GroupRole` lives inside native_node.p2p.P2PRole (it uses its mesh, signer, control socket
and work queue) and claims the messages that belong to a group reduction. The RoundOpen that
follows a reduction can overtake the aggregate an aggregator forwards (they travel on
different paths): `before_frame` holds such a RoundOpen up to `wait_s` for it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.frame import FIXED_HEADER, FIXED_LEN
from shared.hierarchy import GroupReducer, encode_missing, is_group_plan, parse_plan
from shared.messages import SERVER, RoundOpen, Shard, ShardPlan, sha256_hex

if TYPE_CHECKING:
    from native_node.p2p import P2PRole

log = logging.getLogger("native_node.group")


class GroupRole:
    def __init__(self, host: P2PRole, *, wait_s: float = 5.0) -> None:
        self.host = host
        self.reducer: GroupReducer | None = None
        self.group = -1  # our group's index in the current reduction
        self.early: list[Shard] = []  # group traffic that came before its plan
        self.wait_s = wait_s
        self._got = asyncio.Event()  # the combined aggregate of the last reduction came
        self.forwarded = 0  # aggregates this node forwarded as an aggregator
        self._sends: set[asyncio.Future[None]] = set()  # frames on their way to peers

    def claims(self, msg: ShardPlan | Shard) -> bool:
        """Whether `msg` belongs to a group reduction (not to the p2p shard exchange)."""
        if isinstance(msg, ShardPlan):
            return is_group_plan(msg.plan)
        return msg.node_id == SERVER or self.reducer is not None

    async def handle(self, msg: ShardPlan | Shard) -> None:
        if isinstance(msg, ShardPlan):
            await self.on_plan(msg)
        else:
            await self.on_shard(msg)

    async def on_plan(self, msg: ShardPlan) -> None:
        plan, group, digests = parse_plan(msg.plan)
        me, host = self.host.me, self.host
        if me not in plan.members:
            if self.reducer is not None and self.reducer.plan.round == plan.round:
                self.reducer = None  # dropped from this round's reduction
            return
        if host.delta is None or host.delta_round != msg.round:
            log.warning("round %d: a group plan, but this node holds no update for it",
                        msg.round)
            return
        r = self.reducer
        if r is not None and r.plan.round == plan.round and plan.revision > r.plan.revision:
            events = r.revise(plan)
        else:  # a new reduction (a retried round starts again at revision 0)
            old = r if r is not None and r.plan.round == plan.round else None
            self.reducer = r = GroupReducer(me, plan, digests, host.delta, rule=msg.rule,
                                            byzantine_fraction=msg.byzantine_fraction,
                                            result_codec=msg.result_codec)
            if old is not None and r.aggregating:  # updates that came for it already
                r.parts.update({m: p for m, p in old.parts.items()
                                if m in plan.members and sha256_hex(p) == digests[m]})
            self.group = group
            self._got.clear()
            events = r.start()
            log.info("round %d: group %d of %d members; aggregators %s%s", plan.round, group,
                     len(plan.members), [a[:12] for a in plan.owners[0]],
                     " (this node)" if r.aggregating else "")
        self._connect(r)
        if r.aggregating and float(msg.plan.get("report_s") or 0) > 0:
            self._report_later(r, float(msg.plan["report_s"]))
        await self._route(events)
        early, self.early = self.early, []
        for m in early:
            await self.on_shard(m)

    def _report_later(self, r: GroupReducer, delay_s: float) -> None:
        """Tell the server whose updates we still lack `delay_s` after the plan, so that it
        can drop a member that never sent one (e.g. the other aggregator, hung)."""
        revision = r.plan.revision

        async def report() -> None:
            await asyncio.sleep(delay_s)
            if self.reducer is not r or r.plan.revision != revision:
                return
            missing = r.missing()
            if missing:
                log.warning("round %d: no update from %s after %.0f s; telling the server",
                            r.plan.round, [m[:12] for m in missing], delay_s)
                await self._route([{"kind": "part", "to": SERVER,
                                    "payload": encode_missing(missing)}])

        task = asyncio.ensure_future(report())
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def _connect(self, r: GroupReducer) -> None:
        """Channels to our aggregators; an aggregator also to every member."""
        host = self.host
        peers = r.plan.members if r.aggregating else r.plan.owners[0]
        for m in peers:
            if m != host.me and m not in host.connecting and m not in host.mesh.links:
                host.connecting[m] = asyncio.ensure_future(host.mesh.connect(m))

    async def on_shard(self, msg: Shard) -> None:
        r = self.reducer
        if r is None or msg.round != r.plan.round:
            if r is None or msg.round > r.plan.round:
                self.early.append(msg)
                del self.early[:-1000]  # bounded: a flood cannot grow it without end
            return
        try:
            if msg.node_id == SERVER:  # the combined aggregate, to us as an aggregator
                events = r.on_global(msg.payload)
                self.forwarded += 1
            elif msg.kind == "part":
                events = r.on_part(msg.node_id, msg.payload)
            else:
                r.on_forward(msg.node_id, msg.payload)
                events = []
        except ValueError as exc:
            if msg.revision > r.plan.revision or msg.kind == "part":
                # sent under a plan we do not have yet (a revision, or a retried round's
                # new reduction): tried again when the next plan comes
                self.early.append(msg)
                del self.early[:-1000]
                return
            log.warning("round %d: group %s from %s refused: %s", msg.round, msg.kind,
                        msg.node_id[:12], exc)
            return
        await self._route(events)
        agg = r.aggregate()
        if agg is not None and self.host.aggregate_round != r.plan.round:
            self.host.aggregate = np.asarray(agg, dtype=np.float32)
            self.host.aggregate_round = r.plan.round
            self._got.set()
            log.info("round %d: holding the combined aggregate (group bytes this round: %d "
                     "sent, %d received, update %d)", r.plan.round, r.bytes_out, r.bytes_in,
                     len(r.raw))

    async def _route(self, events: list[dict[str, Any]]) -> None:
        r = self.reducer
        assert r is not None
        host = self.host
        for e in events:
            to = e["to"]
            data = host.frame(Shard(run_id=host.run_id, round=r.plan.round, node_id=host.me,
                                    to=to, kind=e["kind"], shard=self.group,
                                    revision=r.plan.revision, payload=e["payload"]))
            if to == SERVER:
                await host.send_ws(data)
                continue
            # in the background: a channel still opening (to a peer that may have vanished)
            # must not hold up the next plan revision
            task = asyncio.ensure_future(self._send_peer(to, data, len(e["payload"])))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    async def _send_peer(self, to: str, data: bytes, size: int) -> None:
        host = self.host
        opening = host.connecting.get(to)
        if opening is not None and not opening.done() and to not in host.mesh.failed:
            await asyncio.wait([opening])  # the first round waits for its channels once
        try:
            if await host.mesh.send(to, data):
                host.sent_direct += size
                return
            host.sent_relayed += size
            await host.send_ws(data)
        except (ConnectionError, ValueError) as exc:
            log.warning("group frame to %s not sent: %s", to[:12], exc)

    async def before_frame(self, data: bytes) -> None:
        """Hold a RoundOpen until the last reduction's combined aggregate is here (at most
        `wait_s`): it follows the reduction by another path than the aggregate."""
        r = self.reducer
        if r is None or len(data) < FIXED_LEN or self._got.is_set():
            return
        if FIXED_HEADER.unpack_from(data, 0)[2] != RoundOpen.TYPE:
            return
        try:
            await asyncio.wait_for(self._got.wait(), timeout=self.wait_s)
        except TimeoutError:
            log.warning("round %d: no combined aggregate from the group's aggregators within "
                        "%.0f s", r.plan.round, self.wait_s)
