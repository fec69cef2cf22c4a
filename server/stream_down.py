"""The streamed downlink at the server (shared.stream_down; docs/protocol.md, "Streamed
params").

With `stream_chunk_mb` > 0, a RoundOpen whose payload is larger than a chunk is signed with
the payload's manifest in its place (server.roundopen asks `offer`). The payload itself is
never copied per node: an `Offer` keeps a reference to the one read-only bytes object the
round's RoundOpens are cut from (`RunState.params_bytes` for full params) and its manifest,
computed once per payload (off the event loop where the caller can wait: `prepare`). A node
answers with a signed `ParamsFetch` (stream id, first chunk); the server then sends that
node's `ParamsChunk` frames in order from one task per connection, each frame built from a
view of the shared payload and awaited on the socket: aiohttp drains the socket's buffer
whenever the transport pauses, so a slow reader holds about one chunk in the server's send
buffer, not the whole model. A fetch for a stream the server no longer offers is refused
with `foreign_chunk`, one that starts beyond the last chunk with `bad_chunk`; a new fetch
from the same node replaces its running one (the resume after a reconnect). When a round
commits, the offers of the old params and the sends still running from them go.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.peers import Connection
from shared.errors import BadChunk, ForeignChunk
from shared.messages import ParamsChunk, ParamsFetch
from shared.stream import chunk, manifest, n_chunks
from shared.stream_down import stream_id

if TYPE_CHECKING:
    from server.coordinator import Coordinator

log = logging.getLogger("server.stream_down")
MAX_OFFERS = 8  # payloads offered at once (full params; a large delta or sparse step)


@dataclass
class Offer:
    """One payload offered in chunks: the shared bytes, their manifest and stream id."""

    payload: bytes | memoryview  # the one read-only copy every node's chunks are cut from
    chunk_bytes: int
    manifest: bytes
    id: str

    @property
    def n(self) -> int:
        return n_chunks(len(self.payload), self.chunk_bytes)


class ParamsStreams:
    """The coordinator's sender of streamed RoundOpen payloads (runs with stream_chunk_mb)."""

    def __init__(self, coord: Coordinator, chunk_bytes: int) -> None:
        self.coord, self.chunk_bytes = coord, chunk_bytes
        self.offers: dict[str, Offer] = {}  # stream id -> offer
        self._by_object: dict[int, Offer] = {}  # id(payload) -> offer (the offer keeps it)
        self.sending: dict[str, tuple[str, asyncio.Task[None]]] = {}  # node -> (stream, task)
        self.counters = coord.counters  # params_streams, params_chunks_sent, params_resumed
        coord.commit_hooks.append(self.after_commit)

    def wants(self, payload: bytes | memoryview) -> bool:
        """Whether this payload goes in chunks."""
        return len(payload) > self.chunk_bytes

    def offer(self, payload: bytes | memoryview) -> Offer:
        """The offer of `payload` (its manifest computed here unless `prepare` did)."""
        found = self._by_object.get(id(payload))
        if found is not None and found.payload is payload:
            return found
        return self._register(payload, manifest(payload, self.chunk_bytes))

    async def prepare(self, payload: bytes | memoryview) -> None:
        """Compute the manifest of a payload about to be offered in a worker thread (SHA-256
        of 0.5 GB takes a second; hashlib releases the GIL)."""
        if not self.wants(payload):
            return
        found = self._by_object.get(id(payload))
        if found is not None and found.payload is payload:
            return
        man = await asyncio.to_thread(manifest, payload, self.chunk_bytes)
        found = self._by_object.get(id(payload))
        if found is None or found.payload is not payload:
            self._register(payload, man)

    def _register(self, payload: bytes | memoryview, man: bytes) -> Offer:
        offer = Offer(payload=payload, chunk_bytes=self.chunk_bytes, manifest=man,
                      id=stream_id(man))
        while len(self.offers) >= MAX_OFFERS:  # the oldest goes (dicts keep insertion order)
            self._withdraw(next(iter(self.offers)))
        self.offers[offer.id] = offer
        self._by_object[id(payload)] = offer
        self.counters["params_streams"] += 1
        log.info("offering a %d-byte RoundOpen payload in %d chunks (stream %s)",
                 len(payload), offer.n, offer.id[:12])
        return offer

    def _withdraw(self, sid: str) -> None:
        offer = self.offers.pop(sid, None)
        if offer is not None:
            self._by_object.pop(id(offer.payload), None)
        for node_id, (s, task) in list(self.sending.items()):
            if s == sid:
                task.cancel()
                self.sending.pop(node_id, None)

    # -- fetches ---------------------------------------------------------------------------
    async def on_fetch(self, conn: Connection, msg: ParamsFetch) -> None:
        """A node's signed ParamsFetch: send it the stream's chunks from `next` on."""
        peer = conn.peer
        assert peer is not None  # authenticated
        offer = self.offers.get(msg.digest)
        if offer is None:
            raise ForeignChunk(f"no streamed RoundOpen {msg.digest[:12]} is offered (its round "
                               "committed, or it never was)", field="digest")
        if msg.next >= offer.n:
            raise BadChunk(f"chunk {msg.next} out of range: the stream has {offer.n} chunks",
                           field="next")
        old = self.sending.pop(peer.node_id, None)
        if old is not None:
            old[1].cancel()
        if msg.next:
            self.counters["params_resumed"] += 1
            log.info("resuming the streamed RoundOpen of %s at chunk %d of %d",
                     peer.node_id[:12], msg.next, offer.n)
        task = asyncio.ensure_future(self._send(conn, offer, msg.round, msg.next))
        self.sending[peer.node_id] = (offer.id, task)
        task.add_done_callback(functools.partial(self._done, peer.node_id))

    def _done(self, node_id: str, task: asyncio.Task[None]) -> None:
        cur = self.sending.get(node_id)
        if cur is not None and cur[1] is task:
            self.sending.pop(node_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("streamed RoundOpen to %s failed: %r", node_id[:12], task.exception())

    async def _send(self, conn: Connection, offer: Offer, round_: int, start: int) -> None:
        """The chunks, in order, each awaited on the socket (aiohttp drains it)."""
        sent = 0
        for i in range(start, offer.n):
            if getattr(conn.ws, "closed", False):  # gone (a data channel has no such flag)
                log.info("streamed RoundOpen interrupted at chunk %d of %d (socket closed)",
                         i, offer.n)
                return
            frame = ParamsChunk(round=round_, digest=offer.id, index=i,
                                payload=chunk(offer.payload, offer.chunk_bytes, i)  # type: ignore[arg-type]
                                ).to_frame()
            await self.coord.send(conn, frame)
            del frame
            sent += 1
            self.counters["params_chunks_sent"] += 1
        log.info("streamed RoundOpen %s sent: chunks %d..%d", offer.id[:12], start,
                 start + sent - 1)

    # -- housekeeping ------------------------------------------------------------------------
    def disconnect(self, node_id: str) -> None:
        cur = self.sending.pop(node_id, None)
        if cur is not None:
            cur[1].cancel()

    def after_commit(self, record: dict[str, Any]) -> None:
        """A round committed: the params it replaced are no longer offered (an offer of the
        new params, made to a node that joined meanwhile, stays)."""
        current = self.coord.run.params_bytes
        for sid, offer in list(self.offers.items()):
            if offer.payload is not current:
                self._withdraw(sid)

    def view(self) -> dict[str, Any]:
        return {"offers": len(self.offers), "sending": len(self.sending)}

    async def close(self) -> None:
        for _, task in list(self.sending.values()):
            task.cancel()
        for _, task in list(self.sending.values()):
            with contextlib.suppress(BaseException):
                await task
