"""A native node's streamed update (docs/protocol.md, "Streamed updates"; server.streams).

The logic is shared.stream_up.Sender's (sans-I/O: the tab drives it too): when the server's
Welcome sets `stream_chunk` and the participant's signed Submit frame is larger than it, the
node sends instead a `StreamSubmit` (the Submit's fields and the SHA-256 manifest of the
payload's chunks, signed once by the participant) and waits for the server's `Resume`, then
sends the chunks from `Resume.next` on, in order, as unsigned `Chunk` frames. After a
reconnect the participant resubmits its pending update; the server, still holding the
verified chunks, answers `Resume` at the first missing one and only the rest travels again.
This module sends those frames on the node's socket: the chunks in a task, one at a time
(the socket's flow control paces them), cancelled by a newer Resume.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

from shared.participant import Participant
from shared.stream_up import MAX_OWN_PAYLOAD, Sender, Upload

__all__ = ["MAX_OWN_PAYLOAD", "Upload", "Uploader"]
log = logging.getLogger("native_node.stream")


class Uploader:
    """The node's one streamed update in flight (the participant's pending one)."""

    def __init__(self, part: Participant) -> None:
        self.part = part
        self.sender = Sender(part)
        self.task: asyncio.Task[None] | None = None
        self.sent_chunks = 0  # chunks sent, all transfers (for logs and tests)

    @property
    def current(self) -> Upload | None:
        return self.sender.current

    def wants(self, frame: bytes) -> bool:
        """Whether this update frame goes streamed (the server's Welcome says from what size)."""
        return self.sender.wants(frame)

    async def start(self, ws: Any, frame: bytes) -> None:
        """Announce the update in `frame` (our own signed Submit) with its manifest."""
        await ws.send_bytes(self.sender.start(frame)["frame"])

    def on_resume(self, ws: Any, data: bytes) -> None:
        """The server's Resume: send the chunks from its `next` on (a task)."""
        frames = self.sender.on_resume(data)
        if frames is None:
            return
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.task = asyncio.ensure_future(self._send(ws, frames))

    async def _send(self, ws: Any, frames: Iterator[bytes]) -> None:
        try:
            for frame in frames:
                if ws.closed:
                    return
                await ws.send_bytes(frame)
                self.sent_chunks += 1
        except (ConnectionError, RuntimeError) as exc:
            log.warning("streamed update interrupted (%s); it resumes after the reconnect",
                        exc)
