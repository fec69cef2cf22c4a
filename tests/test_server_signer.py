"""server.signer: frames signed in worker processes verify exactly as in-process ones."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server import ws as ws_module
from server.keys import COORDINATOR
from server.signer import SIGNATURE_LEN, SigningPool
from shared.envelope import Identity, verify_frame
from shared.errors import BadSignature
from shared.frame import decode_frame
from shared.messages import Ack, Challenge, Welcome, sha256_hex

RUN = "run-signer-test"


def _ack(round_: int = 3) -> Ack:
    return Ack(round=round_, digest=sha256_hex(b"u"), status="accepted")


def _check(ident: Identity, data: bytes, msg: Ack) -> None:
    frame = decode_frame(data)
    assert frame.header["nonce"] == msg.nonce
    assert frame.header["round"] == msg.round
    assert verify_frame(frame, public_key=ident.public_key, run_id=RUN,
                        node_id=ident.node_id) == msg.nonce


def test_pool_signed_frames_verify_and_match_in_process_layout() -> None:
    ident = Identity.generate()

    async def go() -> None:
        pool = SigningPool(ident, RUN, workers=1)
        try:
            msgs = [_ack(r) for r in range(6)]
            frames = await asyncio.gather(*(pool.frame(m) for m in msgs))
            for m, data in zip(msgs, frames, strict=True):
                _check(ident, data, m)
                plain = pool.frame_now(m)  # same bytes but the (randomized) signature
                assert len(plain) == len(data)
                assert plain[:-SIGNATURE_LEN] == data[:-SIGNATURE_LEN]
            assert pool.signed_in_pool == 6
            # a message without a round (Challenge) is signed for round -1, as in process
            ch = Challenge(run_id=RUN, challenge="ab" * 32,
                           server_public_key=ident.public_key.hex(), protocol_version=1,
                           agent="t")
            assert verify_frame(decode_frame(await pool.frame(ch)), public_key=ident.public_key,
                                run_id=RUN, node_id=ident.node_id) == ch.nonce
        finally:
            pool.close()

    asyncio.run(go())


def test_pool_signature_is_bound_to_the_frame() -> None:
    """A pool signature does not carry over to another frame (tampered round)."""
    ident = Identity.generate()

    async def go() -> None:
        pool = SigningPool(ident, RUN, workers=1)
        try:
            msg = _ack(4)
            data = await pool.frame(msg)
            other = pool.frame_now(dataclasses.replace(msg, round=5))
            forged = other[:-SIGNATURE_LEN] + data[-SIGNATURE_LEN:]
            with pytest.raises(BadSignature):
                verify_frame(decode_frame(forged), public_key=ident.public_key, run_id=RUN,
                             node_id=ident.node_id)
        finally:
            pool.close()

    asyncio.run(go())


def test_no_workers_signs_in_process_and_a_broken_pool_falls_back() -> None:
    ident = Identity.generate()

    async def go() -> None:
        inline = SigningPool(ident, RUN, workers=0)
        msg = _ack()
        _check(ident, await inline.frame(msg), msg)
        assert inline.view() == {"workers": 0, "signed_in_pool": 0, "signed_in_process": 1}
        pool = SigningPool(ident, RUN, workers=1)
        _check(ident, await pool.frame(msg), msg)
        assert pool._pool is not None
        for proc in list(pool._pool._processes.values()):  # a worker dies
            proc.kill()
            proc.join()
        await asyncio.sleep(0.2)
        _check(ident, await pool.frame(msg), msg)  # signed in process instead
        assert pool.workers == 0
        assert pool.signed_in_process >= 1
        pool.close()

    asyncio.run(go())


def test_hello_timeout_counts_from_the_challenge_and_spares_a_hello_in_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """server.ws: a connection that says nothing is closed HELLO_TIMEOUT_S after its
    Challenge; one whose Hello came in is not closed while that Hello waits its turn."""
    from tests.test_ws_protocol import serve

    monkeypatch.setattr(ws_module, "HELLO_TIMEOUT_S", 1.0)

    async def go() -> None:
        async with serve(tmp_path) as srv:
            silent = await srv.client("silent", hello=False)
            msg = await silent.ws.receive(timeout=10)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            coord = srv.app[COORDINATOR]
            slow = coord._on_hello

            async def late_hello(conn: Any, hello: Any) -> None:  # the server is behind
                await asyncio.sleep(2.0)
                await slow(conn, hello)

            monkeypatch.setattr(coord, "_on_hello", late_hello)
            c = await srv.client("talker", hello=False)
            await c.send(c.hello())
            assert (await c.expect(Welcome)).node_id == c.node_id

    asyncio.run(go())
