"""A native node's streamed RoundOpen download (shared.stream_down; server.stream_down).

The participant hands over a signed RoundOpen whose payload is a manifest (event
"params_stream"); shared.stream_down.Fetcher (the sans-I/O logic the tab drives too) asks
the server for its chunks with a signed `ParamsFetch`, checks each `ParamsChunk` on arrival
and writes it into one preallocated float32 buffer, and gives the participant the whole
RoundOpen once the last chunk is in (`Participant.round_open`): from there on it is as if
it had come in one frame. This module sends the fetches on the node's socket and hands the
other events back to the client.

After a reconnect the server sends the same manifest again (same stream id): the download
goes on from its first missing chunk. A RoundOpen for params this node already holds (a
round's retry) is completed from them at once, without a download. A refused chunk (typed:
bad_chunk, duplicate_chunk, chunk_out_of_window, foreign_chunk) is logged, counted and
dropped, and changes nothing; a bad chunk where the next one is due asks the server again
from there (at most MAX_REFETCH times per download, then the node reconnects).
"""

from __future__ import annotations

from typing import Any

from shared.messages import ParamsFetch, RoundOpen
from shared.participant import Event, Participant
from shared.stream_down import MAX_REFETCH, Download, Fetcher

__all__ = ["MAX_REFETCH", "Downloader"]


class Downloader:
    """The node's one streamed RoundOpen being downloaded, on its socket."""

    def __init__(self, part: Participant) -> None:
        self.fetcher = Fetcher(part)

    @property
    def current(self) -> Download | None:
        return self.fetcher.current

    @property
    def counts(self) -> dict[str, int]:
        return self.fetcher.counts

    async def start(self, ws: Any, msg: RoundOpen) -> list[Event]:
        """A streamed RoundOpen: fetch its chunks, or complete it from held params."""
        return await self._carry(ws, self.fetcher.start(msg))

    async def on_chunk(self, ws: Any, data: bytes) -> list[Event]:
        """One ParamsChunk frame; the participant's events once the RoundOpen is whole."""
        return await self._carry(ws, self.fetcher.on_chunk(data))

    @staticmethod
    async def _carry(ws: Any, events: list[Event]) -> list[Event]:
        """Send the fetches on `ws`; the other events go back to the caller."""
        out = []
        for ev in events:
            if ev["kind"] == "send" and ev["msg_type"] == ParamsFetch.TYPE:
                await ws.send_bytes(ev["frame"])
            else:
                out.append(ev)
        return out
