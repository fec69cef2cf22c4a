"""A native node's streamed update (docs/protocol.md, "Streamed updates"; server.streams).

When the server's Welcome sets `stream_chunk` and the participant's signed Submit frame is
larger than it, the node sends instead a `StreamSubmit` (the Submit's fields and the SHA-256
manifest of the payload's chunks, signed once by the participant) and waits for the server's
`Resume`, then sends the chunks from `Resume.next` on, in order, as unsigned `Chunk` frames.
After a reconnect the participant resubmits its pending update; the server, still holding the
verified chunks, answers `Resume` at the first missing one and only the rest travels again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from shared.errors import ProtocolError
from shared.messages import Chunk, Resume, StreamSubmit, Submit, decode_message
from shared.participant import Participant
from shared.stream import chunks, manifest, n_chunks

log = logging.getLogger("native_node.stream")
MAX_OWN_PAYLOAD = 2**31 - 1  # our own Submit frame, decoded to split it


@dataclass
class Upload:
    round: int
    digest: str
    payload: bytes
    chunk_bytes: int


class Uploader:
    """The node's one streamed update in flight (the participant's pending one)."""

    def __init__(self, part: Participant) -> None:
        self.part = part
        self.current: Upload | None = None
        self.task: asyncio.Task[None] | None = None
        self.sent_chunks = 0  # chunks sent, all transfers (for logs and tests)

    def wants(self, frame: bytes) -> bool:
        """Whether this update frame goes streamed (the server's Welcome says from what size)."""
        w = self.part.welcome
        return w is not None and w.stream_chunk > 0 and len(frame) > w.stream_chunk

    async def start(self, ws: Any, frame: bytes) -> None:
        """Announce the update in `frame` (our own signed Submit) with its manifest."""
        msg = decode_message(frame, max_payload=MAX_OWN_PAYLOAD)
        assert isinstance(msg, Submit)
        assert self.part.welcome is not None
        cb = self.part.welcome.stream_chunk
        self.current = Upload(round=msg.round, digest=msg.digest, payload=msg.payload,
                              chunk_bytes=cb)
        announce = StreamSubmit(
            run_id=msg.run_id, round=msg.round, node_id=msg.node_id, codec=msg.codec,
            length=msg.length, digest=msg.digest, size=len(msg.payload), chunk_bytes=cb,
            train_loss=msg.train_loss, samples=msg.samples, compute_s=msg.compute_s,
            payload=manifest(msg.payload, cb))
        log.info("round %d: streaming the update (%d bytes in %d chunks)", msg.round,
                 len(msg.payload), n_chunks(len(msg.payload), cb))
        await ws.send_bytes(self.part.frame(announce))

    def on_resume(self, ws: Any, data: bytes) -> None:
        """The server's Resume: send the chunks from its `next` on (a task)."""
        try:
            msg = decode_message(data)
        except ProtocolError as err:
            log.warning("ignoring a bad Resume frame: %s", err)
            return
        cur = self.current
        if not isinstance(msg, Resume) or cur is None \
                or (msg.round, msg.digest) != (cur.round, cur.digest):
            return
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if msg.next:
            log.info("round %d: resuming the streamed update at chunk %d", msg.round, msg.next)
        self.task = asyncio.ensure_future(self._send_from(ws, cur, msg.next))

    async def _send_from(self, ws: Any, up: Upload, start: int) -> None:
        try:
            for i, part in chunks(up.payload, up.chunk_bytes, start):
                if ws.closed:
                    return
                await ws.send_bytes(Chunk(round=up.round, digest=up.digest, index=i,
                                          payload=bytes(part)).to_frame())
                self.sent_chunks += 1
        except (ConnectionError, RuntimeError) as exc:
            log.warning("streamed update interrupted (%s); it resumes after the reconnect",
                        exc)
