"""What the server sends when a round opens: one signed RoundOpen per kind of receiver.

A RoundOpen carries the global params in one of four forms (`kind`):

- "full": the params;
- "delta": the changes against the previous params (shared.downlink), to a node that holds
  them and said `delta-params` in its Hello;
- "outer": only the outer step to apply (p2p members of the last reduction hold the aggregate,
  the previous params and the outer momentum);
- "full+m": the params then the outer momentum (p2p trainers, so that they can step later);
- "sparse": outer "sparseloco": the sparse step that takes the previous params to these
  (shared.sparseloco), to a node that holds them and said `sparse-step` in its Hello.

The reduction strategy (server.reduction) picks "outer" / "full+m" for its topology; the rest
is decided here. With autotune (server.autotune) each node's RoundOpen also carries the round's
time budget, step cap and that node's codec. Each variant (kind, autotune fields) is signed
once per broadcast and the same bytes go to every node that gets it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from server.autotune import AutotuneLoop
from server.outbox import Outbox
from server.peers import Connection, Peer
from server.reduction import Reduction
from server.runstate import RunState
from server.stream_down import ParamsStreams
from shared.downlink import encode_outer_step
from shared.messages import RoundOpen
from shared.rounds import RoundState
from shared.sparseloco import FEATURE as SPARSE_FEATURE
from shared.stream_down import FEATURE as STREAM_FEATURE


class RoundOpener:
    def __init__(self, run: RunState, outbox: Outbox, reduction: Reduction,
                 autotune: AutotuneLoop | None = None) -> None:
        self.run, self.config = run, run.config
        self.outbox, self.reduction = outbox, reduction
        self.autotune = autotune if autotune is not None else AutotuneLoop(run)
        # client-level DP (server.dp_accountant): the open round's sampled trainers (None:
        # all) and the RoundOpen's noise fields; unsampled trainers get no RoundOpen
        self.sample: Callable[[str], bool] | None = None
        self.dp_fields: dict[str, Any] = {}
        # streamed downlink (server.stream_down; run option stream_chunk_mb): a payload
        # larger than a chunk goes as its manifest, then in ParamsChunk frames
        self.streams: ParamsStreams | None = None

    def frame(self, state: RoundState, kind: str = "full",
              tuned: dict[str, Any] | None = None, streamed: bool = False) -> bytes:
        """The RoundOpen of `state` as `kind`, signed; the deadline is the time left now;
        `tuned`: the autotune fields for its node (AutotuneLoop.open_fields); `streamed`: a
        payload larger than a chunk goes as its manifest (server.stream_down)."""
        return self.outbox.frame(self.message(state, kind, tuned, streamed))

    def message(self, state: RoundState, kind: str = "full",
                tuned: dict[str, Any] | None = None, streamed: bool = False) -> RoundOpen:
        """The RoundOpen `frame` signs."""
        run, cfg = self.run, self.config
        base: str | None = None
        payload = run.params_bytes
        if kind == "sparse" and run.sparse_step is not None:
            base, payload = run.prev_digest, run.sparse_step
        elif kind == "delta" and run.params_changes is not None:
            base, payload = run.prev_digest, run.params_changes
        elif kind == "outer":
            base = run.prev_digest
            payload = encode_outer_step(cfg.outer_lr, cfg.outer_momentum)
        elif kind == "full+m":
            payload = run.params_bytes + np.ascontiguousarray(run.momentum, "<f4").tobytes()
        stream: dict[str, Any] = {}
        if streamed and self.streams is not None and self.streams.wants(payload):
            offer = self.streams.offer(payload)
            stream = {"stream_size": len(payload), "chunk_bytes": offer.chunk_bytes}
            payload = offer.manifest
        return RoundOpen(
            run_id=run.run_id, round=state.round, attempt=state.attempt,
            params_digest=run.params_digest,
            deadline_s=max(0.001, state.remaining(asyncio.get_running_loop().time())),
            inner_lr=cfg.inner_lr, batch_size=cfg.batch_size, base_digest=base,
            with_momentum=kind == "full+m", payload=payload,
            **{"inner_steps": cfg.inner_steps, **self.dp_fields, **(tuned or {}), **stream})

    def streams_to(self, peer: Peer | None) -> bool:
        """Whether `peer` gets large RoundOpens in chunks: a streamed run, and its Hello says
        it fetches them (native nodes and tabs)."""
        return (self.streams is not None and peer is not None
                and STREAM_FEATURE in peer.features)

    def streamed_bytes(self, peer: Peer | None, kind: str) -> int:
        """The payload bytes that follow `peer`'s RoundOpen of `kind` in chunks (0: none)."""
        run = self.run
        payload = {"full": run.params_bytes, "sparse": run.sparse_step,
                   "delta": run.params_changes}.get(kind)
        if payload is None or self.streams is None or not self.streams_to(peer):
            return 0
        return len(payload) if self.streams.wants(payload) else 0

    async def _prepare(self, kinds: set[str]) -> None:
        """Streamed runs: the full params' manifest hashed off the event loop, once."""
        if self.streams is not None and "full" in kinds:
            await self.streams.prepare(self.run.params_bytes)

    def takes_part(self, peer: Peer | None) -> bool:
        """Whether `peer` gets the open round: not a trainer the DP sample left out."""
        return (peer is None or self.sample is None or peer.role != "trainer"
                or self.sample(peer.node_id))

    def kind(self, peer: Peer | None) -> str:
        """What the RoundOpen for `peer` carries: the reduction's choice, else the delta
        where the node holds the previous params and takes deltas, else the full params."""
        run = self.run
        holds_prev = peer is not None and peer.holds is not None and peer.holds == run.prev_digest
        if peer is not None and (kind := self.reduction.open_kind(peer, holds_prev)):
            return kind
        if (peer is not None and holds_prev and run.sparse_step is not None
                and SPARSE_FEATURE in peer.features):
            return "sparse"
        if (peer is not None and holds_prev and run.params_changes is not None
                and "delta-params" in peer.features):
            return "delta"
        return "full"

    async def send(self, state: RoundState, conn: Connection, data: bytes | None = None, *,
                   mark: bool = True) -> None:
        """The open round to one connection (`data`: already signed for its kind); a
        trainer that has not submitted is marked training unless `mark` is off (retries)."""
        peer = conn.peer
        if not self.takes_part(peer):
            return
        if (mark and peer is not None and peer.role == "trainer"
                and peer.node_id not in state.updates):
            peer.state = "training"
        kind = self.kind(peer)
        tuned = self.autotune.open_fields(peer.node_id if peer else None, state.round)
        if data is None:  # one node (a join): signed off the event loop
            streamed = self.streams_to(peer)
            if streamed:
                await self._prepare({kind})
            data = await self.outbox.signed(self.message(state, kind, tuned, streamed))
        await self.outbox.send(conn, data)
        if peer is not None:
            self.autotune.on_open(peer.node_id, len(data) + self.streamed_bytes(peer, kind))
            peer.holds = self.run.params_digest
            peer.has_momentum = peer.has_momentum or kind == "full+m"

    async def broadcast(self, state: RoundState, *, retry: bool = False) -> None:
        """The open round to every connected node that has not submitted to it."""
        waiting = [p for p in list(self.outbox.peers.values())
                   if p.ws is not None and p.node_id not in state.updates
                   and self.takes_part(p)]
        frames: dict[str, bytes] = {}  # each variant signed once, the same bytes for all
        await self._prepare({self.kind(p) for p in waiting if self.streams_to(p)})
        sends = []
        for p in waiting:
            if p.ws is None:
                continue
            kind = self.kind(p)
            tuned = self.autotune.open_fields(p.node_id, state.round)
            streamed = self.streams_to(p)
            key = kind + json.dumps(tuned, sort_keys=True) + ("+stream" if streamed else "")
            if key not in frames:
                frames[key] = self.frame(state, kind, tuned, streamed)
            sends.append(self.send(state, Connection(ws=p.ws, remote="", peer=p),
                                   frames[key], mark=not retry))
        await asyncio.gather(*sends)
