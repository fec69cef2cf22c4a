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
import logging
from typing import TYPE_CHECKING, Any

from shared.errors import BadChunk, BadUpdate, ForeignChunk, ProtocolError
from shared.messages import ParamsChunk, ParamsFetch, RoundOpen, decode_message
from shared.stream import DEFAULT_WINDOW, Reassembly
from shared.vec import numpy_module

if TYPE_CHECKING:
    from shared.participant import Event, Participant

log = logging.getLogger("shared.stream_down")
MAX_REFETCH = 3  # bad chunks at the point the download waits for, before a reconnect
MAX_CHUNK_FRAME = 2**31 - 1  # a ParamsChunk frame (its payload is checked against the manifest)

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


class Fetcher:
    """A participant's streamed RoundOpens, without I/O (the native node's and the tab's
    driver both use it): `start` on the participant's "params_stream" event, `on_chunk` on
    each ParamsChunk frame; both return events to carry out ("send" the ParamsFetch frame,
    and once the RoundOpen is whole, the participant's own events for it).

    A RoundOpen for params the participant already holds (a round's retry) is completed from
    them at once. The same payload announced again (after a reconnect) is fetched from the
    first missing chunk. A refused chunk (typed) is counted and dropped and changes nothing;
    a bad one where the download waits makes it fetch again from there, MAX_REFETCH times at
    most, then the participant reconnects."""

    def __init__(self, part: Participant) -> None:
        self.part = part
        self.current: Download | None = None
        self.refetches = 0
        self.counts: dict[str, int] = {}  # chunks, fetches, resumed, from_held, refusals by code

    def _count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def max_size(self) -> int:
        """The largest streamed payload taken: params and outer momentum."""
        w = self.part.welcome
        return 8 * w.n_params + 4096 if w is not None else 0

    def start(self, msg: RoundOpen) -> list[Event]:
        """A streamed RoundOpen: fetch its chunks (from where a download of the same payload
        stopped), or complete it at once from params the participant holds."""
        held = self._from_held(msg)
        if held is not None:
            self._count("from_held")
            log.info("round %d: streamed RoundOpen of params this node holds; no download",
                     msg.round)
            return self.part.round_open(held)
        cur = self.current
        if cur is not None and cur.same(msg):
            start = cur.renew(msg)
            self._count("resumed")
            log.info("round %d: resuming the params download at chunk %d of %d", msg.round,
                     start, cur.reassembly.n)
        else:
            self.current = None  # the old buffer goes before the new one is allocated
            try:
                cur = self.current = Download(msg, max_size=self.max_size())
            except ProtocolError as err:
                self._count(err.code)
                return [{"kind": "refused", "message": f"{err.code}: {err}"}]
            start = 0
            log.info("round %d: downloading the params (%d bytes in %d chunks)", msg.round,
                     msg.stream_size, cur.reassembly.n)
        self.refetches = 0
        return [self._fetch(cur, start)]

    def _from_held(self, msg: RoundOpen) -> RoundOpen | None:
        part = self.part
        if (msg.base_digest is not None or msg.with_momentum or part.held is None
                or part.held_digest != msg.params_digest
                or 4 * len(part.held) != msg.stream_size):
            return None
        try:
            return dataclasses.replace(msg, payload=memoryview(part.held).cast("B"),  # type: ignore[arg-type]
                                       stream_size=0, chunk_bytes=0)
        except (BadUpdate, TypeError, ValueError):  # held was changed in place: download
            return None

    def _fetch(self, cur: Download, start: int) -> Event:
        self._count("fetches")
        return {"kind": "send", "msg_type": ParamsFetch.TYPE,
                "frame": self.part.frame(ParamsFetch(
                    run_id=cur.msg.run_id, round=cur.msg.round, node_id=self.part.node_id,
                    digest=cur.id, next=start))}

    def on_chunk(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """One ParamsChunk frame: checked and written, or refused; the participant's events
        once the RoundOpen is whole."""
        index: int | None = None
        try:
            msg = decode_message(data, max_payload=MAX_CHUNK_FRAME)
            if not isinstance(msg, ParamsChunk):
                return []
            index = msg.index
            cur = self.current
            if cur is None:
                raise ForeignChunk(f"chunk {msg.index} of stream {msg.digest[:12]}: no "
                                   "download is open", field="digest")
            whole = cur.accept(msg)
        except BadUpdate as err:  # a refused chunk (or the whole not matching its digest)
            return self._refused(err, index)
        except ProtocolError as err:
            self._count(err.code)
            log.warning("refused a params chunk: %s: %s", err.code, err)
            return []
        self._count("chunks")
        if whole is None:
            return []
        self.current = None
        log.info("round %d: params download complete", whole.round)
        return self.part.round_open(whole)

    def _refused(self, err: BadUpdate, index: int | None) -> list[Event]:
        self._count(err.code)
        cur = self.current
        if cur is not None and cur.complete:  # every chunk matched, the whole did not
            self.current = None
            return [{"kind": "reconnect", "message": f"streamed params: {err}"}]
        log.warning("refused a params chunk: %s: %s", err.code, err)
        if cur is not None and err.code == "bad_chunk" and index == cur.next:  # the one due
            self.refetches += 1
            if self.refetches > MAX_REFETCH:
                self.current = None
                return [{"kind": "reconnect",
                         "message": f"{self.refetches} bad chunks in a row from the server"}]
            return [self._fetch(cur, cur.reassembly.resume())]
        return []
