"""The streamed RoundOpen (shared.stream_down, server.stream_down) against a real server on
loopback, frame by frame: with `stream_chunk_mb` the server signs a RoundOpen whose payload is
the params' manifest and sends the chunks a node fetches; a node's Download checks every
chunk (a bad, repeated, out-of-window or foreign one is a typed refusal that changes
nothing) and rebuilds the RoundOpen whose digest is the params'; a fetch for a stream the
server does not offer, or from beyond its last chunk, gets its typed Error; after a
reconnect the same stream is offered again and the download goes on from its first missing
chunk."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from shared.errors import BadChunk, ChunkOutOfWindow, DuplicateChunk, ForeignChunk
from shared.messages import (
    ParamsChunk,
    ParamsFetch,
    RoundOpen,
    Welcome,
    decode_message,
    sha256_hex,
)
from shared.stream_down import FEATURE, Download, stream_id
from tests.test_ws_protocol import Client, Server, serve

CB = 1024  # the smallest chunk: mlp-digits params travel in more chunks than the window
CHUNK_MB = CB / 2**20


def fetch_msg(c: Client, digest: str, start: int = 0, round_: int | None = None
              ) -> ParamsFetch:
    return ParamsFetch(run_id=c.opened.run_id, node_id=c.node_id, digest=digest, next=start,
                       round=c.opened.round if round_ is None else round_)


async def joined(srv: Server, name: str, features: str = FEATURE) -> Client:
    """A client whose Hello says it fetches streamed RoundOpens (as native nodes do)."""
    c = await srv.client(name, hello=False)
    await c.send(c.hello(features=features))
    c.welcome = await c.expect(Welcome)
    c.open = await c.expect(RoundOpen)
    return c


async def fetch(c: Client, msg: RoundOpen, start: int = 0) -> None:
    await c.send(fetch_msg(c, stream_id(msg.payload), start, msg.round))


async def chunk_msg(c: Client) -> ParamsChunk:
    raw = await c.ws.receive(timeout=10)
    assert raw.type == aiohttp.WSMsgType.BINARY, raw
    msg = decode_message(raw.data)
    assert isinstance(msg, ParamsChunk), msg
    return msg


async def download(c: Client, msg: RoundOpen, dl: Download | None = None,
                   start: int = 0) -> tuple[RoundOpen, list[int]]:
    """Fetch from `start` and take every chunk: (the whole RoundOpen, indices received)."""
    dl = dl or Download(msg, max_size=1 << 26)
    await fetch(c, msg, start)
    seen: list[int] = []
    while True:
        part = await chunk_msg(c)
        seen.append(part.index)
        whole = dl.accept(part)
        if whole is not None:
            return whole, seen


async def params_of(c: Client, msg: RoundOpen) -> np.ndarray:
    """The params a (possibly streamed) RoundOpen carries."""
    if msg.stream_size:
        msg = (await download(c, msg))[0]
    return np.frombuffer(msg.payload, "<f4")


async def test_a_streamed_roundopen_rebuilds_the_params_and_bad_chunks_change_nothing(
        tmp_path: Path) -> None:
    async with serve(tmp_path, quorum=2, stream_chunk_mb=CHUNK_MB, deadline_s=60.0) as srv:
        plain = await srv.client("plain")  # no "stream-params" in its Hello (a tab): one frame
        assert (plain.opened.stream_size, plain.opened.chunk_bytes) == (0, 0)
        assert sha256_hex(plain.opened.payload) == plain.opened.params_digest
        a = await joined(srv, "a")
        opened = a.opened
        n_bytes = 4 * a.n_params
        assert (opened.stream_size, opened.chunk_bytes) == (n_bytes, CB)
        assert len(opened.payload) == 32 * -(-n_bytes // CB)  # the manifest, not the params
        dl = Download(opened, max_size=1 << 26)
        n = dl.reassembly.n
        assert n > 17
        await fetch(a, opened)
        good = [await chunk_msg(a) for _ in range(n)]
        assert [g.index for g in good] == list(range(n))
        assert {g.digest for g in good} == {dl.id}
        assert dl.accept(good[0]) is None
        assert dl.accept(good[1]) is None

        def state() -> tuple[int, frozenset[int], str]:
            return dl.next, frozenset(dl.reassembly.ahead), sha256_hex(bytes(dl._view))

        before = state()
        tampered = bytearray(good[2].payload)
        tampered[5] ^= 0xFF
        other = "ab" * 32
        cases: list[tuple[ParamsChunk, type[Exception]]] = [
            (ParamsChunk(round=0, digest=dl.id, index=2, payload=bytes(tampered)), BadChunk),
            (ParamsChunk(round=0, digest=dl.id, index=2, payload=good[3].payload), BadChunk),
            (ParamsChunk(round=0, digest=dl.id, index=2, payload=good[2].payload[:-1]),
             BadChunk),
            (good[1], DuplicateChunk),
            (good[2 + 16], ChunkOutOfWindow),
            (ParamsChunk(round=0, digest=other, index=2, payload=good[2].payload),
             ForeignChunk),
            (ParamsChunk(round=1, digest=dl.id, index=2, payload=good[2].payload),
             ForeignChunk),
        ]
        for bad, err in cases:
            with pytest.raises(err) as info:
                dl.accept(bad)
            assert type(info.value) is err
            assert state() == before  # refused: nothing written, nothing counted as received
        assert dl.counts["refused"] == len(cases)
        whole = None
        for g in good[2:]:
            whole = dl.accept(g)
        assert whole is not None  # its construction checked params_digest over the whole
        assert (whole.stream_size, whole.chunk_bytes) == (0, 0)
        assert sha256_hex(whole.payload) == opened.params_digest
        assert bytes(whole.payload) == plain.opened.payload
        assert (whole.round, whole.inner_steps, whole.deadline_s) == (
            opened.round, opened.inner_steps, opened.deadline_s)
        run = await srv.api("/api/run")
        assert not run["rejected"]


async def test_fetches_the_server_does_not_offer_get_typed_errors(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="server")
    async with serve(tmp_path, quorum=2, stream_chunk_mb=CHUNK_MB, deadline_s=60.0) as srv:
        a = await joined(srv, "a")
        sid = stream_id(a.opened.payload)
        n = -(-a.opened.stream_size // CB)
        await a.send(fetch_msg(a, "cd" * 32))
        assert (await a.error("foreign_chunk")).field == "digest"
        await a.send(fetch_msg(a, sid, n))
        assert (await a.error("bad_chunk")).field == "next"
        run = await srv.api("/api/run")
        assert run["rejected"] == {"foreign_chunk": 1, "bad_chunk": 1}
        assert "foreign_chunk" in caplog.text
        whole, seen = await download(a, a.opened)  # the stream itself is untouched
        assert seen == list(range(n))
        assert sha256_hex(whole.payload) == a.opened.params_digest


async def test_after_a_reconnect_the_download_goes_on_from_the_first_missing_chunk(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="server.stream_down")
    async with serve(tmp_path, quorum=2, stream_chunk_mb=CHUNK_MB, deadline_s=60.0) as srv:
        a = await joined(srv, "a")
        dl = Download(a.opened, max_size=1 << 26)
        await fetch(a, a.opened)
        for _ in range(3):
            dl.accept(await chunk_msg(a))
        await a.ws.close()  # cut mid-download
        again = await joined(srv, "a")  # the same identity, a new socket
        assert dl.same(again.opened)  # the same payload, the same stream id
        start = dl.renew(again.opened)
        assert start == 3
        whole, seen = await download(again, again.opened, dl, start)
        assert seen == list(range(3, dl.reassembly.n))  # only the missing chunks travelled
        assert sha256_hex(whole.payload) == again.opened.params_digest
        assert "resuming the streamed RoundOpen of" in caplog.text
        assert "at chunk 3 of" in caplog.text


async def test_without_streaming_the_roundopen_is_one_frame_and_fetches_are_refused(
        tmp_path: Path) -> None:
    async with serve(tmp_path, quorum=2, deadline_s=60.0) as srv:
        a = await joined(srv, "a")  # it would fetch, but the run does not stream
        assert (a.opened.stream_size, a.opened.chunk_bytes) == (0, 0)
        assert sha256_hex(a.opened.payload) == a.opened.params_digest
        await a.send(fetch_msg(a, "cd" * 32))
        assert (await a.error("bad_update")).field == "msg_type"


async def test_a_node_that_does_not_read_holds_the_server_to_about_one_chunk_in_flight(
        tmp_path: Path) -> None:
    """Flow control: llama tiny's 410 KB of params in 8 KiB chunks to a node that fetches and
    then reads nothing (its socket is not read; both ends' socket buffers are made small, so
    that the kernel cannot take the whole payload): the server's send task waits on the
    socket (aiohttp drains it) with about one chunk in its own write buffer, and goes on
    when the node reads."""
    from server.keys import COORDINATOR

    cb = 8192
    async with serve(tmp_path, model="llama", flavour="tiny", quorum=2,
                     stream_chunk_mb=cb / 2**20, deadline_s=120.0) as srv:
        a = await joined(srv, "a")
        coord = srv.app[COORDINATOR]
        n = -(-a.opened.stream_size // cb)
        assert a.opened.stream_size > 400_000
        peer = coord.peers[a.node_id]
        transport = peer.ws._req.transport  # type: ignore[union-attr]
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                      32768)
        a.ws.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        assert a.ws._conn is not None
        reader = a.ws._conn.transport
        assert reader is not None
        reader.pause_reading()  # the node reads nothing
        await fetch(a, a.opened)
        await asyncio.sleep(1.0)
        sent = coord.counters["params_chunks_sent"]
        assert 0 < sent < n, (sent, n)  # the rest waits: the kernel took what it could
        streams = coord.params_streams
        assert streams is not None
        assert not streams.sending[a.node_id][1].done()  # the sender waits on the socket
        assert transport.get_write_buffer_size() <= 65536 + 2 * cb
        reader.resume_reading()
        dl = Download(a.opened, max_size=1 << 26)
        whole = None
        while whole is None:
            whole = dl.accept(await chunk_msg(a))
        assert sha256_hex(whole.payload) == a.opened.params_digest
        assert coord.counters["params_chunks_sent"] == n
