"""A trainer's side of the `p2p` topology (server/p2p.py has the server's).

After training, the node keeps its update and sends `Ready`. On the round's `ShardPlan` it runs
shared.p2p.ShardReducer: its slice of every shard goes to that shard's owners, the shards it
owns are reduced and uploaded to the server, and the primaries' reduced shards come back to it,
so it ends the round holding the aggregate. Shard frames travel over direct data channels
(native_node/mesh.py); to a peer whose channel is not open (yet, or ever) they go through the
server, which forwards them. With `stream_chunk_mb` (Welcome.stream_chunk) the plan's shards
are at most a chunk and this node's parts go through native_node/p2p_send.py (windowed,
acknowledged, resent from the first unacknowledged piece after a lost channel;
shared/p2p_stream.py). At the next RoundOpen the server sends either the params and the
outer momentum (`with_momentum`) or only the outer step to apply (shared.downlink), which this
node computes from what it holds and checks against the params digest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from native_node.group import GroupRole
from native_node.mesh import PeerMesh
from native_node.p2p_send import PieceSender
from shared.downlink import apply_outer_step, is_outer_step, resolve
from shared.errors import DuplicateChunk, ProtocolError
from shared.messages import (
    SERVER,
    Message,
    RoundOpen,
    SecAgg,
    Shard,
    ShardPlan,
    Signal,
    decode_message,
)
from shared.p2p import Plan, ShardReducer
from shared.p2p_stream import ACK, ack_again, check_ack
from shared.secagg.p2p import ACCUSE_STAGE, SECAGG_RULE, BadMaskedSlice, SecAggShardReducer
from shared.vec import from_bytes
from transport.rtc import IceServer

log = logging.getLogger("native_node.p2p")

Frame = Callable[[Message], bytes]  # sign a message as this node
STREAM_FIRST_WAIT_S = 5.0  # streamed runs: longest wait for a first channel before relaying
SendWs = Callable[[bytes], Awaitable[None]]  # a signed frame on the control socket


class P2PRole:
    def __init__(self, node_id: str, run_id: str, frame: Frame, send_ws: SendWs, *,
                 ice_servers: Sequence[IceServer] | None = None, timeout_s: float = 10.0,
                 stream_chunk: int = 0) -> None:
        self.me, self.run_id = node_id, run_id
        # streamed runs (stream_chunk_mb > 0): pieces windowed, acknowledged and resumed
        self.stream = stream_chunk > 0
        self.pieces = PieceSender(self)
        self.refused: dict[str, int] = {}  # typed refusals of pieces, by error code
        self.frame, self.send_ws = frame, send_ws
        self.mesh = PeerMesh(node_id, self._signal, self._on_link_frame,
                             ice_servers=ice_servers, timeout_s=timeout_s)
        self.delta: np.ndarray | None = None  # our update for `delta_round`
        self.delta_round = -1
        self.reducer: ShardReducer | None = None
        self.early: list[Shard] = []  # shard traffic that came before its plan
        self.aggregate: np.ndarray | None = None  # the last round's aggregate, once assembled
        self.aggregate_round = -1
        self.momentum: np.ndarray | None = None  # outer momentum (from the server, then ours)
        self.connecting: dict[str, asyncio.Task[bool]] = {}
        self.frames: dict[tuple[str, int, int], bytes] = {}  # the last part frame per sender
        self.sent_direct = self.sent_relayed = 0
        # peer discovery on the same channels (native_node.dht): takes its Dht frames
        self.on_dht: Callable[[str, bytes], bool] | None = None
        # plans and shards are handled one at a time by a worker task, never inside the
        # control socket's read loop or aiortc's callbacks (which must keep running: the
        # signals that open our channels arrive there)
        self.inbox: asyncio.Queue[ShardPlan | Shard] = asyncio.Queue()
        self.group = GroupRole(self)  # p2p_groups > 0: hierarchical aggregation instead
        self.worker = asyncio.ensure_future(self._work())

    def put(self, msg: ShardPlan | Shard) -> None:
        self.inbox.put_nowait(msg)

    async def _work(self) -> None:
        while True:
            msg = await self.inbox.get()
            try:
                if self.group.claims(msg):
                    await self.group.handle(msg)
                elif isinstance(msg, ShardPlan):
                    await self.on_plan(msg)
                else:
                    await self.on_shard(msg)
            except (ConnectionError, ProtocolError, ValueError, TimeoutError) as exc:
                log.warning("p2p: %s failed: %s", type(msg).__name__, exc)

    # -- signaling and links ---------------------------------------------------------------
    async def _signal(self, to: str, kind: str, data: str) -> None:
        await self.send_ws(self.frame(Signal(run_id=self.run_id, node_id=self.me, to=to,
                                             kind=kind, data=data)))

    async def on_signal(self, sender: str, kind: str, data: str) -> None:
        await self.mesh.on_signal(sender, kind, data)

    def _connect_all(self, plan: Plan) -> None:
        for m in plan.members:
            if m != self.me and m not in self.connecting and m not in self.mesh.links:
                self.connecting[m] = asyncio.ensure_future(self.mesh.connect(m))

    async def _on_link_frame(self, peer: str, frame: bytes) -> None:
        """A frame on `peer`'s channel: the channel is that peer's (its SDP came through the
        server attested), so the frame's node_id must be `peer`."""
        if self.on_dht is not None and self.on_dht(peer, frame):
            return
        try:
            msg = decode_message(frame, max_payload=len(frame) + 1024)
        except ProtocolError as exc:
            log.warning("bad frame on %s's channel: %s", peer[:12], exc)
            return
        if not isinstance(msg, Shard) or msg.node_id != peer:
            log.warning("unexpected %s from %s on its channel", type(msg).__name__, peer[:12])
            return
        if msg.kind == "part" and (self.reducer is None  # kept as signed: the evidence
                                   or isinstance(self.reducer, SecAggShardReducer)):
            self.frames[(peer, msg.round, msg.shard)] = frame
        self.put(msg)

    # -- the round -------------------------------------------------------------------------
    def trained(self, round_: int, delta: np.ndarray) -> None:
        self.delta, self.delta_round = delta, round_  # float32 LE, as hashed into Ready

    async def on_plan(self, msg: ShardPlan) -> None:
        plan = Plan.from_dict(msg.plan)
        if self.me not in plan.members:
            if self.reducer is not None and self.reducer.plan.round == plan.round:
                self.reducer = None  # dropped from this round's reduction
            return
        if self.delta is None or self.delta_round != msg.round:
            log.warning("round %d: a shard plan, but this node holds no update for it",
                        msg.round)
            return
        self._connect_all(plan)
        self.frames = {k: f for k, f in self.frames.items() if k[1] >= plan.round}
        r = self.reducer
        if r is not None and r.plan.round == plan.round and plan.revision > r.plan.revision:
            if r.stream and plan.members != r.plan.members:
                self.pieces.reset()  # every piece goes again under the new member set
            events = r.revise(plan)
        elif msg.rule == SECAGG_RULE:  # secure aggregation: self.delta holds masked words
            self.reducer = r = SecAggShardReducer(self.me, plan, self.delta.tobytes())
            events = r.start()
        else:
            self.pieces.reset()
            self.reducer = r = ShardReducer(self.me, plan, self.delta, rule=msg.rule,
                                            byzantine_fraction=msg.byzantine_fraction,
                                            result_codec=msg.result_codec, stream=self.stream)
            events = r.start()
            log.info("round %d: p2p reduction with %d members; this node owns shards %s",
                     plan.round, len(plan.members), plan.owned_by(self.me))
        await self._route(events)
        early, self.early = self.early, []
        for m in early:
            await self.on_shard(m)

    async def on_shard(self, msg: Shard) -> None:
        r = self.reducer
        if r is None or msg.round != r.plan.round:
            if r is None or msg.round > r.plan.round:
                self.early.append(msg)
                del self.early[:-10_000]  # bounded: a flood cannot grow it without end
            return
        try:
            if msg.kind == ACK:
                check_ack(r, msg.node_id, msg.shard, msg.payload)
                self.pieces.acked(msg.node_id, msg.shard)
                return
            if msg.kind == "part":
                events = r.on_part(msg.node_id, msg.shard, msg.payload)
            else:
                events = r.on_result(msg.shard, msg.payload)
        except BadMaskedSlice as exc:  # secure p2p: hand the signed slice to the server
            log.warning("round %d: %s", msg.round, exc.message)
            frame = self.frames.pop((msg.node_id, msg.round, msg.shard), None)
            if frame is not None:
                await self.send_ws(self.frame(SecAgg(run_id=self.run_id, round=msg.round,
                                                     node_id=self.me, stage=ACCUSE_STAGE,
                                                     payload=frame)))
            return
        except (ValueError, ProtocolError) as exc:
            if msg.revision > r.plan.revision:  # sent under a plan we do not have yet
                self.early.append(msg)
                return
            if isinstance(exc, ProtocolError):  # a streamed piece refused: nothing changed
                self.refused[exc.code] = self.refused.get(exc.code, 0) + 1
                if isinstance(exc, DuplicateChunk):  # resent after a lost channel
                    await self._route(ack_again(r, msg.node_id, msg.shard, msg.payload))
                    return
            log.warning("round %d: shard %d %s from %s refused: %s", msg.round, msg.shard,
                        msg.kind, msg.node_id[:12], exc)
            return
        await self._route(events)
        if r.done and self.aggregate_round != r.plan.round:
            self.aggregate = np.asarray(r.aggregate(), dtype=np.float32)
            self.aggregate_round = r.plan.round
            log.info("round %d: holding the aggregate (%d bytes sent directly, %d relayed; "
                     "shard bytes this round: %d sent, %d received, update %d)", r.plan.round,
                     self.sent_direct, self.sent_relayed, r.bytes_out, r.bytes_in,
                     len(r.raw))
            if r.stream:
                p = self.pieces
                log.info("round %d: streamed: %d shards; %d pieces sent, %d resent after %d "
                         "lost channels since start; largest shard frame %d bytes; peak held %d "
                         "bytes; "
                         "refused %s", r.plan.round, r.plan.n_shards, p.pieces_sent,
                         p.pieces_resent, p.resumes, p.max_frame, r.peak_held_bytes,
                         dict(sorted(self.refused.items())))

    async def _route(self, events: list[dict[str, Any]]) -> None:
        r = self.reducer
        assert r is not None
        for e in events:
            to = e["to"]
            if r.stream and e["kind"] == "part":
                self.pieces.add(to, e["shard"])  # windowed, acknowledged, resumed
                continue
            msg = Shard(run_id=self.run_id, round=r.plan.round, node_id=self.me, to=to,
                        kind=e["kind"], shard=e["shard"], revision=r.plan.revision,
                        payload=e["payload"])
            data = self.frame(msg)
            self.pieces.max_frame = max(self.pieces.max_frame, len(data))
            if to == SERVER:
                await self.send_ws(data)
                continue
            await self.first_channel(to)
            try:
                direct = await self.mesh.send(to, data)
            except (ConnectionError, TimeoutError):  # closed or stalled under the frame: relay
                direct = False
            if direct:
                self.sent_direct += len(e["payload"])
            else:
                self.sent_relayed += len(e["payload"])
                await self.send_ws(data)

    async def first_channel(self, to: str) -> None:
        """Wait for the channel to `to` if it is opening for the first time (the first round
        waits for its channels once). A peer whose channel was open once and is gone (closed
        under us, a fresh negotiation under way) gets our frames through the relay meanwhile:
        the peer that offers may never offer again, and the answering side would wait for
        `rtc_timeout_s` with every frame held back. Streamed runs wait at most
        STREAM_FIRST_WAIT_S (a channel closed before this side saw it open looks the same)."""
        task = self.connecting.get(to)
        if (task is not None and not task.done() and to not in self.mesh.failed
                and to not in self.mesh.pairs):
            await asyncio.wait([task], timeout=STREAM_FIRST_WAIT_S if self.stream else None)

    # -- the next round's params -----------------------------------------------------------
    def params(self, msg: RoundOpen, held: np.ndarray | None, held_digest: str | None
               ) -> np.ndarray:
        """theta for `msg`: with the momentum, full, a delta, or our own outer step."""
        if msg.with_momentum:
            n = len(msg.payload) // 8
            self.momentum = np.asarray(from_bytes(msg.payload[4 * n:]), dtype=np.float32)
            return np.asarray(from_bytes(msg.payload[:4 * n]), dtype=np.float32)
        if msg.base_digest is not None and is_outer_step(msg.payload):
            agg = self.aggregate if self.aggregate_round == msg.round - 1 else None
            if held_digest != msg.base_digest:
                held = None
            theta, m = apply_outer_step(held, self.momentum, agg, msg.payload,
                                        msg.params_digest)
            self.momentum = np.asarray(m, dtype=np.float32)
            return np.asarray(theta, dtype=np.float32)
        return np.asarray(resolve(msg, held, held_digest), dtype=np.float32)

    async def close(self) -> None:
        self.worker.cancel()
        self.pieces.reset()
        for t in self.connecting.values():
            t.cancel()
        await self.mesh.close()
