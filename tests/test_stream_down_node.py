"""The native node's download driver (native_node.stream_down.Downloader) with the real
Participant against a real server on loopback: a streamed RoundOpen becomes the
participant's train event with the right params; a bad chunk where the download waits is
refused (typed, counted), changes nothing and makes the node fetch again from there; a
streamed RoundOpen of params the node holds completes without a download; a server that
keeps sending bad chunks makes the node reconnect."""

from __future__ import annotations

from typing import Any

import aiohttp
import numpy as np
import pytest

from native_node.stream_down import MAX_REFETCH, Downloader
from shared.messages import ParamsChunk, sha256_hex
from shared.participant import Participant
from shared.stream_down import FEATURE
from tests.test_stream_down_wire import CB, CHUNK_MB
from tests.test_ws_protocol import identity, serve


class Stop(Exception):
    """Ends a drive early."""


def bad_chunk(dl: Downloader, index: int) -> bytes:
    cur = dl.current
    assert cur is not None
    return ParamsChunk(round=cur.msg.round, digest=cur.id, index=index,
                       payload=bytes(CB)).to_frame()


async def drive(ws: Any, part: Participant, dl: Downloader, on_stream: Any) -> dict[str, Any]:
    """Feed server frames to the participant (chunks to the downloader) until it trains."""
    while True:
        raw = await ws.receive(timeout=10)
        assert raw.type == aiohttp.WSMsgType.BINARY, raw
        if raw.data[5] == ParamsChunk.TYPE:
            events = await dl.on_chunk(ws, raw.data)
        else:
            events = part.receive(raw.data)
        for ev in events:
            if ev["kind"] == "send":
                await ws.send_bytes(ev["frame"])
            elif ev["kind"] == "params_stream":
                events.extend(await dl.start(ws, ev["message"]))
                await on_stream(ev["message"])
            elif ev["kind"] == "train":
                return ev
            elif ev["kind"] in ("fatal", "reconnect"):
                raise AssertionError(ev)


async def test_a_streamed_roundopen_trains_and_a_bad_chunk_is_refetched(tmp_path: Any) -> None:
    async with serve(tmp_path, quorum=2, stream_chunk_mb=CHUNK_MB, deadline_s=60.0) as srv:
        part = Participant(identity("n"), runtime="native", agent="test", device="cpu")
        part.extra_features = (FEATURE,)  # as native nodes say
        dl = Downloader(part)
        seen: list[Any] = []

        async def inject(msg: Any) -> None:  # before any real chunk has been read
            seen.append(msg)
            cur = dl.current
            assert cur is not None
            before = (cur.next, sha256_hex(bytes(cur._view)))
            assert await dl.on_chunk(ws, bad_chunk(dl, 0)) == []
            assert (cur.next, sha256_hex(bytes(cur._view))) == before  # nothing written
            assert dl.counts["bad_chunk"] == 1
            assert dl.counts["fetches"] == 2  # the chunk it waits for was bad: asked again

        async with srv.http.ws_connect(srv.url + "/ws") as ws:
            part.connection_made()
            train = await drive(ws, part, dl, inject)
            opened = seen[0]
            assert train["params_digest"] == opened.params_digest
            assert sha256_hex(train["params"]) == opened.params_digest
            assert len(train["params"]) == opened.stream_size
            assert dl.current is None  # the buffer went to the participant
            n = -(-opened.stream_size // CB)
            assert dl.counts["chunks"] == n
            # the first fetch's chunks that arrived after the refetch are duplicates
            assert dl.counts["chunks"] + dl.counts.get("duplicate_chunk", 0) <= 2 * n
            # the same RoundOpen again (a retry): the node holds its params, no download
            fetches = dl.counts["fetches"]
            assert await dl.start(ws, opened) == []  # a retry of the round being trained
            assert dl.counts["from_held"] == 1
            assert dl.counts["fetches"] == fetches
            assert np.array_equal(part.held, np.frombuffer(train["params"], "<f4"))
        run = await srv.api("/api/run")
        assert not run["rejected"]


async def test_a_server_that_keeps_sending_bad_chunks_makes_the_node_reconnect(
        tmp_path: Any) -> None:
    async with serve(tmp_path, quorum=2, stream_chunk_mb=CHUNK_MB, deadline_s=60.0) as srv:
        part = Participant(identity("m"), runtime="native", agent="test", device="cpu")
        part.extra_features = (FEATURE,)  # as native nodes say
        dl = Downloader(part)
        events: list[list[Any]] = []

        async def inject(msg: Any) -> None:
            for _ in range(MAX_REFETCH + 1):
                events.append(await dl.on_chunk(ws, bad_chunk(dl, 0)))
            raise Stop

        async with srv.http.ws_connect(srv.url + "/ws") as ws:
            part.connection_made()
            with pytest.raises(Stop):
                await drive(ws, part, dl, inject)
        assert events[:MAX_REFETCH] == [[]] * MAX_REFETCH
        assert [e["kind"] for e in events[-1]] == ["reconnect"]
        assert dl.current is None
        assert dl.counts["bad_chunk"] == MAX_REFETCH + 1
        assert dl.counts["fetches"] == 1 + MAX_REFETCH
