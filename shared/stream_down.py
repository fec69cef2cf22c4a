"""The streamed downlink (docs/protocol.md, "Streamed params"): a RoundOpen in chunks.

When a run streams (`stream_chunk_mb` > 0) and a RoundOpen's payload is larger than the chunk
size, the server signs a RoundOpen whose payload is the payload's manifest (shared.stream: one
SHA-256 per chunk) and whose `stream_size` / `chunk_bytes` say how it is cut; its
`params_digest` stays the check of the whole; only to nodes whose Hello lists the feature
"stream-params" (the others get one frame). The node answers with a signed `ParamsFetch`
(the stream id, the first chunk it wants), and the server sends unsigned `ParamsChunk`
frames from there, in order. The stream id is the SHA-256 of the manifest: it names the
payload's bytes, whatever round, attempt or node they go to.

`Download` is the receiver's side (pure: the tab drives it too): it checks each chunk on
arrival against the manifest (shared.stream.Reassembly: `bad_chunk`, `duplicate_chunk`,
`chunk_out_of_window`; a chunk of another stream: `foreign_chunk`), writes it straight into
one preallocated buffer (float32 where numpy is present, else a bytearray), and when the
last chunk is in hands back the RoundOpen exactly as if it had come in one frame (its
constructor checks `params_digest` over the whole). A refused chunk changes nothing. After a
reconnect the server sends the same manifest again (same stream id): the download goes on
from its first missing chunk (`resume`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from shared.errors import BadChunk, ForeignChunk
from shared.messages import ParamsChunk, RoundOpen
from shared.stream import DEFAULT_WINDOW, Reassembly
from shared.vec import numpy_module

FEATURE = "stream-params"  # Hello feature: this node fetches streamed RoundOpens


def stream_id(manifest: bytes | memoryview) -> str:
    """The id of a streamed payload: SHA-256 (hex) of its manifest."""
    return hashlib.sha256(manifest).hexdigest()


def alloc(size: int) -> tuple[Any, memoryview]:
    """A buffer of `size` bytes to download into, and a writable byte view of it: float32
    (numpy) when the size allows, so that the params need no copy to be used as a vector."""
    np = numpy_module()
    if np is not None and size % 4 == 0:
        buf = np.empty(size // 4, dtype=np.float32)
        return buf, memoryview(buf).cast("B")
    raw = bytearray(size)
    return raw, memoryview(raw)


class Download:
    """One streamed RoundOpen payload being received (see the module doc)."""

    def __init__(self, msg: RoundOpen, *, max_size: int, window: int = DEFAULT_WINDOW) -> None:
        if not msg.stream_size:
            raise ValueError("not a streamed RoundOpen")
        if msg.stream_size > max_size:
            raise BadChunk(f"a streamed RoundOpen of {msg.stream_size} bytes is larger than "
                           f"this node takes ({max_size})", field="stream_size")
        self.msg = msg
        self.id = stream_id(msg.payload)
        self.buffer, self._view = alloc(msg.stream_size)
        self.reassembly = Reassembly(size=msg.stream_size, chunk_bytes=msg.chunk_bytes,
                                     manifest=bytes(msg.payload), sink=self._write,
                                     window=window)
        self.counts = {"chunks": 0, "refused": 0, "resumed": 0}

    def _write(self, offset: int, data: bytes | memoryview) -> None:
        self._view[offset:offset + len(data)] = data

    def same(self, msg: RoundOpen) -> bool:
        """Whether `msg` announces this very payload (a resend after a reconnect, or the
        round's retry): then the download goes on where it is."""
        return (msg.stream_size == self.msg.stream_size
                and msg.chunk_bytes == self.msg.chunk_bytes
                and stream_id(msg.payload) == self.id)

    def renew(self, msg: RoundOpen) -> int:
        """The same payload announced again (`same`): keep the verified chunks, take the new
        RoundOpen's fields (deadline, attempt), and return the first chunk to ask for."""
        self.msg = msg
        self.counts["resumed"] += 1
        return self.reassembly.resume()

    @property
    def next(self) -> int:
        return self.reassembly.next

    @property
    def complete(self) -> bool:
        return self.reassembly.complete

    def accept(self, msg: ParamsChunk) -> RoundOpen | None:
        """Check and write one chunk; the whole RoundOpen once the last is in. A refusal
        (a ProtocolError: bad, duplicate, out-of-window or foreign chunk) changes nothing.
        The whole payload not matching `params_digest` raises BadUpdate."""
        if msg.digest != self.id or msg.round != self.msg.round:
            self.counts["refused"] += 1
            raise ForeignChunk(f"chunk of stream {msg.digest[:12]} (round {msg.round}); this "
                               f"node downloads {self.id[:12]} (round {self.msg.round})",
                               field="digest")
        try:
            self.reassembly.accept(msg.index, msg.payload)
        except Exception:
            self.counts["refused"] += 1
            raise
        self.counts["chunks"] += 1
        return self.whole() if self.complete else None

    def whole(self) -> RoundOpen:
        """The RoundOpen with its whole payload (the buffer itself, not a copy); its
        construction checks `params_digest` (BadUpdate)."""
        return dataclasses.replace(self.msg, payload=self._view,  # type: ignore[arg-type]
                                   stream_size=0, chunk_bytes=0)
