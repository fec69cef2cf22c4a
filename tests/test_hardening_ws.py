"""A hostile participant against a real server on loopback: refusals are capped per
connection, nothing queued behind a close is processed, hostile numbers are refused before they
reach the store, and the API stays strict JSON."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import aiohttp
import numpy as np

from server.keys import RUN
from server.peers import MAX_REFUSALS, PRE_HELLO_REFUSALS
from server.store import MAX_REJECTION_ROWS_PER_NODE
from server.ws import LIMITS
from shared.frame import encode_frame
from shared.messages import Ack, RoundCommitted, Submit
from tests.test_ws_protocol import Server, serve

JUNK = b"\x00" * 10


async def closed(ws: aiohttp.ClientWebSocketResponse) -> int:
    """Read until the server closes; the number of frames read before."""
    n = 0
    while True:
        msg = await ws.receive(timeout=20)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                        aiohttp.WSMsgType.CLOSING):
            return n
        n += 1


async def strict_json(srv: Server, path: str) -> object:
    async with srv.http.get(srv.url + path) as resp:
        text = await resp.text()
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


async def test_pre_hello_junk_is_capped_and_the_queue_dropped(tmp_path: Path) -> None:
    async with serve(tmp_path, quorum=1) as srv:
        c = await srv.client("junk", hello=False)
        for _ in range(200):  # all queued before the server reads the first
            await c.ws.send_bytes(JUNK)
        assert await closed(c.ws) == PRE_HELLO_REFUSALS  # one Error each, then the close
        assert c.ws.close_code == 1008
        await asyncio.sleep(0.3)  # the behaviour under test: the queued frames stay unread
        run = await srv.api("/api/run")
        assert run["rejected_total"] == PRE_HELLO_REFUSALS
        assert run["limits"]["closed_for_refusals"] == 1
        assert srv.app[RUN].store.rejections() == []  # nothing unauthenticated is stored


async def test_after_hello_refusals_stop_at_the_limit(tmp_path: Path) -> None:
    async with serve(tmp_path, quorum=1) as srv:
        a = await srv.client("a")
        bad = a.frame(a.submit(length=7))  # signed, well-formed, refused (bad_update)
        frames = [bad] + [a.frame(a.submit(length=7)) for _ in range(40)]
        for i in range(MAX_REFUSALS + 300):
            await a.ws.send_bytes(frames[i % len(frames)])
        got = await closed(a.ws)
        assert got == MAX_REFUSALS  # every refusal up to the limit answered, none after
        await asyncio.sleep(0.3)  # the behaviour under test: the queued frames stay unread
        run = await srv.api("/api/run")
        assert run["rejected_total"] == MAX_REFUSALS
        rows = srv.app[RUN].store.rejection_rows_per_node()
        assert rows[a.node_id] <= MAX_REJECTION_ROWS_PER_NODE + 14
        counts = {r["code"]: r["n"] for r in await srv.api(
            f"/api/rejections/counts?node_id={a.node_id}")}
        assert sum(counts.values()) == MAX_REFUSALS


async def test_hostile_numbers_never_reach_the_store(tmp_path: Path) -> None:
    async with serve(tmp_path, quorum=1, rounds=2) as srv:
        a = await srv.client("a")
        assert a.welcome is not None
        assert a.challenge is not None
        assert a.open is not None
        for name, value in (("samples", 10**20), ("train_loss", 1.7e308), ("compute_s", -1)):
            msg = a.submit()
            header = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)
                      if f.name != "payload"}
            header[name] = value
            data = encode_frame(Submit.TYPE, header, msg.payload, sign=a.ident.signer(
                run_id=a.challenge.run_id, round_=msg.round, msg_type=Submit.TYPE,
                nonce=msg.nonce))
            await a.send(data)
            assert (await a.error("bad_message")).field == name
        await a.send(a.submit(np.full(a.welcome.n_params, 0.01, np.float32)))
        assert (await a.expect(Ack)).status == "accepted"
        assert (await a.expect(RoundCommitted)).round == 0
        for path in ("/api/run", "/api/rounds", "/api/peers", "/api/rejections"):
            await strict_json(srv, path)
        (r0,) = await srv.api("/api/rounds")
        assert r0["train_loss"] == 1.0


async def test_junk_connections_cost_the_server_no_signature(tmp_path: Path) -> None:
    async with serve(tmp_path, quorum=1) as srv:
        for _ in range(6):
            c = await srv.client("junk", hello=False)
            for _ in range(PRE_HELLO_REFUSALS):
                await c.ws.send_bytes(JUNK)
            assert await closed(c.ws) == PRE_HELLO_REFUSALS
            # the server's handler has ended (and given its unanswered challenge back)
            deadline = asyncio.get_running_loop().time() + 10
            while not srv.app[LIMITS].challenges.pool:
                assert asyncio.get_running_loop().time() < deadline, "challenge not given back"
                await asyncio.sleep(0.01)
        limits = (await srv.api("/api/run"))["limits"]
        assert limits["challenges_signed"] <= 2  # unanswered challenges are reused
        assert limits["refusals_signed"] == PRE_HELLO_REFUSALS  # cached, signed once each
        a = await srv.client("a")  # an honest node still gets in on a reused challenge
        assert a.welcome is not None
