"""Streamed updates against a real server on loopback, frame by frame: every bad chunk (one
that fails its manifest check, arrives twice, is beyond the window, or belongs to another
update) gets its typed Error, a log line and a counter, and leaves the transfer as it was: the
good chunks that follow complete it, and the round commits the right aggregate (median, from
the spooled update, in column blocks)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest

from shared.codecs import get_codec
from shared.envelope import new_nonce
from shared.messages import (
    Ack,
    Chunk,
    Resume,
    RoundCommitted,
    RoundOpen,
    StreamSubmit,
    sha256_hex,
)
from shared.stream import chunk, manifest, n_chunks
from tests.test_ws_protocol import Client, serve

CB = 1024  # the smallest chunk: 38 chunks for mlp-digits, more than the 16-chunk window


def announce(c: Client, payload: bytes) -> StreamSubmit:
    assert c.welcome is not None
    return StreamSubmit(run_id=c.welcome.run_id, round=c.opened.round, node_id=c.node_id,
                        nonce=new_nonce(), codec="raw32", length=c.n_params,
                        digest=sha256_hex(payload), size=len(payload), chunk_bytes=CB,
                        train_loss=1.0, samples=10, compute_s=0.1,
                        payload=manifest(payload, CB))


def chunk_frame(payload: bytes, i: int, *, digest: str | None = None, round_: int = 0,
                data: bytes | None = None) -> bytes:
    return Chunk(round=round_, digest=digest or sha256_hex(payload), index=i,
                 payload=bytes(chunk(payload, CB, i)) if data is None else data).to_frame()


async def test_bad_chunks_are_refused_typed_and_the_transfer_still_completes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="server")
    async with serve(tmp_path, quorum=3, aggregator="median", stream_chunk_mb=0.01,
                     deadline_s=60.0) as srv:
        a, b, liar = [await srv.client(name) for name in ("a", "b", "liar")]
        assert a.welcome is not None
        assert a.welcome.stream_chunk == int(0.01 * 2**20)
        n = a.n_params
        theta0 = np.frombuffer(a.opened.payload, "<f4")
        payload = get_codec("raw32").encode(np.full(n, 0.02, np.float32))
        total = n_chunks(len(payload), CB)
        assert total > 17
        await a.send(announce(a, payload))
        assert (await a.expect(Resume)).next == 0
        spool = tmp_path / "run" / "spool"
        part = next(spool.glob("*.part"))

        def progress() -> tuple[int, str]:
            return part.stat().st_size, hashlib.sha256(part.read_bytes()).hexdigest()

        await a.ws.send_bytes(chunk_frame(payload, 0))
        await a.ws.send_bytes(chunk_frame(payload, 1))
        tampered = bytearray(chunk(payload, CB, 2))
        tampered[7] ^= 0xFF
        other = get_codec("raw32").encode(np.full(n, 5.0, np.float32))
        cases = [
            (chunk_frame(payload, 2, data=bytes(tampered)), "bad_chunk"),
            (chunk_frame(payload, 2, data=bytes(chunk(other, CB, 2))), "bad_chunk"),
            (chunk_frame(payload, 1), "duplicate_chunk"),
            (chunk_frame(payload, 2 + 16), "chunk_out_of_window"),
            (chunk_frame(other, 2), "foreign_chunk"),  # another update's digest
            (chunk_frame(payload, 2, round_=1), "foreign_chunk"),  # another round
        ]
        # a refused chunk is in none of the transfer's state: wait for the good chunks to
        # land, then the bytes on disk must not move under the bad ones
        before = None
        for frame, code in cases:
            await a.ws.send_bytes(frame)
            err = await a.error(code)
            assert err.field in ("payload", "index", "digest")
            now = progress()
            assert before is None or now == before
            before = now
        run = await srv.api("/api/run")
        assert run["rejected"] == {"bad_chunk": 2, "duplicate_chunk": 1,
                                   "chunk_out_of_window": 1, "foreign_chunk": 2}
        assert "chunk_out_of_window" in caplog.text
        for i in range(2, total):
            await a.ws.send_bytes(chunk_frame(payload, i))
        ack = await a.expect(Ack)
        assert (ack.status, ack.digest) == ("accepted", sha256_hex(payload))
        assert [p.suffix for p in spool.iterdir()] == [".f32"]  # decoded, on disk
        # a resent announcement for the update already taken: a duplicate, nothing streams
        await a.send(announce(a, payload))
        assert (await a.expect(Ack)).status == "duplicate"
        for c, value in ((b, 0.01), (liar, 1000.0)):
            await c.send(c.submit(np.full(n, value, np.float32)))
            assert (await c.expect(Ack)).status == "accepted"
        await a.expect(RoundCommitted)
        theta1 = np.frombuffer((await a.expect(RoundOpen)).payload, "<f4")
        # median of (0.02 streamed, 0.01, 1000) = 0.02; outer lr 1, no momentum
        np.testing.assert_allclose(theta0 - theta1, 0.02, rtol=1e-4, atol=1e-6)
        assert list(spool.iterdir()) == []  # the committed round's spool file is gone


async def test_a_run_without_streaming_refuses_stream_frames_and_says_so(
        tmp_path: Path) -> None:
    async with serve(tmp_path, quorum=2, deadline_s=60.0) as srv:  # stream_chunk_mb 0
        a = await srv.client("a")
        assert a.welcome is not None
        assert a.welcome.stream_chunk == 0  # nodes send every update in one Submit
        payload = get_codec("raw32").encode(np.full(a.n_params, 0.02, np.float32))
        await a.send(announce(a, payload))
        err = await a.error("bad_update")
        assert err.field == "msg_type"
        await a.ws.send_bytes(chunk_frame(payload, 0))
        assert (await a.error("bad_message")).field == "msg_type"
        assert not (tmp_path / "run" / "spool").exists()
        run = await srv.api("/api/run")
        assert run["rejected"] == {"bad_update": 1, "bad_message": 1}
        assert run["accepted"] == 0
