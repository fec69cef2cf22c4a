"""A participant's streamed update, without I/O (docs/protocol.md, "Streamed updates";
server.streams receives it). The native node (native_node.stream_upload) drives it on its
socket, the tab (browser/node/node_glue.py) in Pyodide. Stdlib only.

When the server's Welcome sets `stream_chunk` and the participant's signed Submit frame is
larger than it, the driver sends instead a `StreamSubmit` (the Submit's fields and the
SHA-256 manifest of the payload's chunks, signed once by the participant: `Sender.start`)
and waits for the server's signed `Resume`; then it sends the chunks from `Resume.next` on,
in order, as unsigned `Chunk` frames (`Sender.on_resume` gives them, one frame at a time,
made when asked for). After a reconnect the participant resubmits its pending update (a
"send" event of its Submit frame, as at first): the server, still holding the verified
chunks, answers `Resume` at the first missing one, and only the rest travels again.

A native node that encoded its update by chunks into a spool (shared.chunk_encode) has no
Submit frame: `Sender.start_spooled` announces it from its fields and manifest, and its
chunks are read from the spool as they go out.

A Resume that does not verify (the server's key, replay), that is not for the update in
flight, or that comes when none is, is counted and ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.errors import ProtocolError
from shared.messages import Chunk, Resume, StreamSubmit, Submit, decode_message
from shared.stream import chunks, manifest, n_chunks

if TYPE_CHECKING:
    from shared.chunk_encode import Spooled
    from shared.participant import Event, Participant

log = logging.getLogger("shared.stream_up")
MAX_OWN_PAYLOAD = 2**31 - 1  # our own Submit frame, decoded to split it


@dataclass
class Upload:
    """The update in flight: what its chunks are cut from (its payload, or `read(index)`:
    a chunk read from a spool file, shared.chunk_encode)."""

    round: int
    digest: str
    payload: bytes
    chunk_bytes: int
    read: Callable[[int], bytes] | None = None
    size: int = 0  # payload bytes (when `read`)

    @property
    def n(self) -> int:
        return n_chunks(self.size if self.read else len(self.payload), self.chunk_bytes)

    def frames(self, start: int) -> Iterator[bytes]:
        """The Chunk frames from `start` to the last, each made when asked for."""
        parts = ((i, self.read(i)) for i in range(start, self.n)) if self.read \
            else chunks(self.payload, self.chunk_bytes, start)
        for i, part in parts:
            yield Chunk(round=self.round, digest=self.digest, index=i,
                        payload=bytes(part)).to_frame()


class Sender:
    """The participant's one streamed update in flight (see the module doc)."""

    def __init__(self, part: Participant) -> None:
        self.part = part
        self.current: Upload | None = None
        self.counts: dict[str, int] = {}  # started, resumed (Resume next > 0), ignored_resumes

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def wants(self, frame: bytes | bytearray | memoryview) -> bool:
        """Whether this update frame goes streamed (the server's Welcome says from what size)."""
        w = self.part.welcome
        return w is not None and w.stream_chunk > 0 and len(frame) > w.stream_chunk

    def start(self, frame: bytes | bytearray | memoryview) -> Event:
        """Our own signed Submit `frame` -> the "send" event of its StreamSubmit (fields and
        manifest, signed); it replaces any update in flight."""
        msg = decode_message(frame, max_payload=MAX_OWN_PAYLOAD)
        if not isinstance(msg, Submit):
            raise TypeError(f"only a Submit goes streamed, not {type(msg).__name__}")
        assert self.part.welcome is not None
        cb = self.part.welcome.stream_chunk
        self.current = up = Upload(round=msg.round, digest=msg.digest, payload=msg.payload,
                                   chunk_bytes=cb)
        announce = StreamSubmit(
            run_id=msg.run_id, round=msg.round, node_id=msg.node_id, codec=msg.codec,
            length=msg.length, digest=msg.digest, size=len(msg.payload), chunk_bytes=cb,
            train_loss=msg.train_loss, samples=msg.samples, compute_s=msg.compute_s,
            payload=manifest(msg.payload, cb))
        self._count("started")
        log.info("round %d: streaming the update (%d bytes in %d chunks)", msg.round,
                 len(msg.payload), up.n)
        return {"kind": "send", "msg_type": StreamSubmit.TYPE,
                "frame": self.part.frame(announce)}

    def start_spooled(self, up: Spooled) -> Event:
        """A pending update encoded into a spool (shared.chunk_encode) -> the "send" event of
        its StreamSubmit; its chunks are then read from the spool as they go out."""
        self.current = Upload(round=up.round, digest=up.digest, payload=b"",
                              chunk_bytes=up.chunk_bytes, read=up.read_chunk, size=up.size)
        announce = StreamSubmit(
            run_id=up.run_id, round=up.round, node_id=up.node_id, codec=up.codec,
            length=up.length, digest=up.digest, size=up.size, chunk_bytes=up.chunk_bytes,
            train_loss=up.train_loss, samples=up.samples, compute_s=up.compute_s,
            payload=up.manifest)
        self._count("started")
        log.info("round %d: streaming the update from its spool (%d bytes in %d chunks)",
                 up.round, up.size, self.current.n)
        return {"kind": "send", "msg_type": StreamSubmit.TYPE,
                "frame": self.part.frame(announce)}

    def on_resume(self, data: bytes | bytearray | memoryview) -> Iterator[bytes] | None:
        """The server's Resume frame -> the Chunk frames to send, from its `next` on (a lazy
        iterator: a driver that gets a newer Resume drops the older one's); None when the
        frame is ignored."""
        try:
            msg = self.part.trust.open(bytes(data))
        except ProtocolError as err:
            self._count("ignored_resumes")
            log.warning("ignoring a bad Resume frame: %s", err)
            return None
        cur = self.current
        if not isinstance(msg, Resume) or cur is None \
                or (msg.round, msg.digest) != (cur.round, cur.digest):
            self._count("ignored_resumes")
            return None
        if msg.next >= cur.n:
            self._count("ignored_resumes")
            log.warning("ignoring a Resume at chunk %d: the update has %d", msg.next, cur.n)
            return None
        if msg.next:
            self._count("resumed")
            log.info("round %d: resuming the streamed update at chunk %d", msg.round, msg.next)
        return cur.frames(msg.next)

    def stream(self, events: list[Event]) -> list[Event]:
        """Events with every Submit "send" that `wants` streaming replaced by its StreamSubmit
        (the rest as they are)."""
        return [self.start(ev["frame"])
                if ev["kind"] == "send" and ev["msg_type"] == Submit.TYPE
                and self.wants(ev["frame"]) else ev
                for ev in events]
