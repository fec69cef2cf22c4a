"""A native node's streamed RoundOpen download (shared.stream_down; server.stream_down).

The participant hands over a signed RoundOpen whose payload is a manifest (event
"params_stream"); this module asks the server for its chunks with a signed `ParamsFetch`,
checks each `ParamsChunk` on arrival and writes it into one preallocated buffer
(shared.stream_down.Download), and gives the participant the whole RoundOpen once the last
chunk is in (`Participant.round_open`): from there on it is as if it had come in one frame.

After a reconnect the server sends the same manifest again (same stream id): the download
goes on from its first missing chunk. A RoundOpen for params this node already holds (a
round's retry) is completed from them at once, without a download. A refused chunk (typed:
bad_chunk, duplicate_chunk, chunk_out_of_window, foreign_chunk) is logged, counted and
dropped, and changes nothing; a bad chunk where the next one is due asks the server again
from there (at most MAX_REFETCH times per download, then the node reconnects).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Any

from shared.errors import BadUpdate, ForeignChunk, ProtocolError
from shared.messages import ParamsChunk, ParamsFetch, RoundOpen, decode_message
from shared.participant import MAX_MESSAGE, Event, Participant
from shared.stream_down import Download

log = logging.getLogger("native_node.stream")
MAX_REFETCH = 3  # bad chunks at the point the download waits for, before it reconnects


class Downloader:
    """The node's one streamed RoundOpen being downloaded."""

    def __init__(self, part: Participant) -> None:
        self.part = part
        self.current: Download | None = None
        self.refetches = 0
        self.counts: Counter[str] = Counter()  # chunks, refusals by code, fetches, resumed

    def max_size(self) -> int:
        """The largest streamed payload this node takes: params and outer momentum."""
        w = self.part.welcome
        return 8 * w.n_params + 4096 if w is not None else 0

    async def start(self, ws: Any, msg: RoundOpen) -> list[Event]:
        """A streamed RoundOpen: fetch its chunks (from where a download of the same payload
        stopped), or complete it at once from params this node holds."""
        held = self._from_held(msg)
        if held is not None:
            self.counts["from_held"] += 1
            log.info("round %d: streamed RoundOpen of params this node holds; no download",
                     msg.round)
            return self.part.round_open(held)
        cur = self.current
        if cur is not None and cur.same(msg):
            start = cur.renew(msg)
            self.counts["resumed"] += 1
            log.info("round %d: resuming the params download at chunk %d of %d", msg.round,
                     start, cur.reassembly.n)
        else:
            self.current = None  # the old buffer goes before the new one is allocated
            try:
                cur = self.current = Download(msg, max_size=self.max_size())
            except ProtocolError as err:
                self.counts[err.code] += 1
                return [{"kind": "refused", "message": f"{err.code}: {err}"}]
            start = 0
            log.info("round %d: downloading the params (%d bytes in %d chunks)", msg.round,
                     msg.stream_size, cur.reassembly.n)
        self.refetches = 0
        await self._fetch(ws, cur, start)
        return []

    def _from_held(self, msg: RoundOpen) -> RoundOpen | None:
        """The whole RoundOpen from the params the participant holds, when they are its."""
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

    async def _fetch(self, ws: Any, cur: Download, start: int) -> None:
        self.counts["fetches"] += 1
        await ws.send_bytes(self.part.frame(ParamsFetch(
            run_id=cur.msg.run_id, round=cur.msg.round, node_id=self.part.node_id,
            digest=cur.id, next=start)))

    async def on_chunk(self, ws: Any, data: bytes) -> list[Event]:
        """One ParamsChunk frame: checked and written, or refused; the participant's events
        once the RoundOpen is whole."""
        index: int | None = None
        try:
            msg = decode_message(data, max_payload=MAX_MESSAGE)
            if not isinstance(msg, ParamsChunk):
                return []
            index = msg.index
            cur = self.current
            if cur is None:
                raise ForeignChunk(f"chunk {msg.index} of stream {msg.digest[:12]}: no "
                                   "download is open", field="digest")
            whole = cur.accept(msg)
        except BadUpdate as err:  # a refused chunk (or the whole not matching its digest)
            return await self._refused(ws, err, index)
        except ProtocolError as err:
            self.counts[err.code] += 1
            log.warning("refused a params chunk: %s: %s", err.code, err)
            return []
        self.counts["chunks"] += 1
        if whole is None:
            return []
        self.current = None
        log.info("round %d: params download complete", whole.round)
        return self.part.round_open(whole)

    async def _refused(self, ws: Any, err: BadUpdate, index: int | None) -> list[Event]:
        self.counts[err.code] += 1
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
            await self._fetch(ws, cur, cur.reassembly.resume())
        return []
