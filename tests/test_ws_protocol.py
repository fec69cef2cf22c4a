"""The control channel against a real aiohttp server on loopback: every bad input gets a
typed error back, a log line and a counter, and nothing committed changes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from server.app import make_app
from server.keys import COORDINATOR, RUN
from server.runstate import open_run
from shared.codecs import get_codec
from shared.envelope import Identity, new_nonce
from shared.frame import FIXED_HEADER, MAGIC, encode_frame
from shared.messages import (
    Ack,
    Challenge,
    Error,
    Hello,
    Message,
    RoundCommitted,
    RoundOpen,
    Submit,
    Welcome,
    sha256_hex,
)
from shared.trust import ServerTrust

IDENTITIES: dict[str, Identity] = {}
M = TypeVar("M", bound=Message)


def identity(name: str) -> Identity:
    if name not in IDENTITIES:
        IDENTITIES[name] = Identity.generate()
    return IDENTITIES[name]


def node_id(name: str) -> str:
    return identity(name).node_id


class Server:
    def __init__(self, app: web.Application, url: str, http: aiohttp.ClientSession,
                 tmp: Path) -> None:
        self.app, self.url, self.http, self.tmp = app, url, http, tmp

    async def api(self, path: str) -> Any:
        async with self.http.get(self.url + path) as resp:
            return await resp.json()

    async def client(self, name: str, *, hello: bool = True) -> Client:
        ws = await self.http.ws_connect(self.url + "/ws")
        c = Client(ws, identity(name), self.tmp / f"trust-{name}")
        c.challenge = await c.expect(Challenge)
        if hello:
            await c.send(c.hello())
            c.welcome = await c.expect(Welcome)
            c.open = await c.expect(RoundOpen)
        return c


class Client:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse, ident: Identity,
                 trust_dir: Path) -> None:
        self.ws, self.ident, self.node_id = ws, ident, ident.node_id
        trust_dir.mkdir(parents=True, exist_ok=True)
        # every frame from the server is verified exactly as the real node verifies it
        self.trust = ServerTrust(max_payload=1 << 26)
        self.challenge: Challenge | None = None
        self.welcome: Welcome | None = None
        self.open: RoundOpen | None = None

    @property
    def n_params(self) -> int:
        """The run's parameter count (from the Welcome this client has had)."""
        assert self.welcome is not None
        return self.welcome.n_params

    @property
    def opened(self) -> RoundOpen:
        """The latest RoundOpen this client has had."""
        assert self.open is not None
        return self.open

    def hello(self, **over: Any) -> Hello:
        assert self.challenge is not None
        fields = dict(node_id=self.node_id, public_key=self.ident.public_key.hex(),
                      challenge=self.challenge.challenge, nonce=new_nonce(), runtime="native",
                      agent="test", device="cpu")
        fields.update(over)
        return Hello(**fields)

    def frame(self, msg: Message, *, signer: Identity | None = None, **sign_over: Any) -> bytes:
        """The message signed as the real client signs it (or by `signer`)."""
        assert self.challenge is not None
        ident = signer or self.ident
        args: dict[str, Any] = dict(run_id=self.challenge.run_id,
                                    round_=getattr(msg, "round", -1), msg_type=msg.TYPE,
                                    nonce=msg.nonce)
        args.update(sign_over)
        return msg.to_frame(sign=ident.signer(**args))

    async def send(self, msg: Message | bytes) -> None:
        await self.ws.send_bytes(msg if isinstance(msg, bytes) else self.frame(msg))

    async def recv(self) -> Message:
        raw = await self.ws.receive(timeout=10)
        assert raw.type == aiohttp.WSMsgType.BINARY, raw
        return self.trust.open(raw.data)

    async def expect(self, cls: type[M]) -> M:
        msg = await self.recv()
        assert isinstance(msg, cls), msg
        return msg

    async def error(self, code: str) -> Error:
        err = await self.expect(Error)
        assert err.code == code, err
        assert err.message
        return err

    def submit(self, values: np.ndarray | None = None, **over: Any) -> Submit:
        assert self.welcome is not None
        assert self.open is not None
        vec = values if values is not None else np.full(self.welcome.n_params, 0.01, np.float32)
        payload = over.pop("payload", get_codec("raw32").encode(vec))
        fields = dict(run_id=self.welcome.run_id, round=self.open.round, node_id=self.node_id,
                      nonce=new_nonce(), codec="raw32", length=self.welcome.n_params,
                      digest=sha256_hex(payload),
                      train_loss=1.0, samples=10, compute_s=0.1, payload=payload)
        fields.update(over)
        return Submit(**fields)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    run = open_run(tmp_path / "run", {"model": "mlp-digits", "quorum": 2, "deadline_s": 60.0,
                                      "rounds": 3, "max_frame_mb": 1.0})
    app = make_app(run)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as http:
        yield Server(app, f"http://127.0.0.1:{port}", http, tmp_path)
    await runner.cleanup()


@asynccontextmanager
async def serve(tmp_path: Path, **config: Any) -> AsyncIterator[Server]:
    """A real server on loopback for an mlp-digits run (outer lr 1, no momentum: the outer
    step moves theta by exactly the aggregate) with `config` on top."""
    run = open_run(tmp_path / "run", {"model": "mlp-digits", "outer_momentum": 0.0,
                                      "outer_lr": 1.0, **config})
    app = make_app(run)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession() as http:
            yield Server(app, f"http://127.0.0.1:{runner.addresses[0][1]}", http, tmp_path)
    finally:
        await runner.cleanup()


def raw32_unchecked(n: int, value: float) -> bytes:
    """A raw32 payload the encoder would refuse to write (it checks for NaN/inf)."""
    return b"\x00" + np.full(n, value, np.float32).astype("<f4").tobytes()


def ckpt_hashes(tmp_path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((tmp_path / "run" / "checkpoints").glob("*.safetensors"))}


async def test_bad_frames_get_typed_errors_and_change_nothing(
        server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="server")  # the coordinator's and the socket's
    before = ckpt_hashes(tmp_path)
    a = await server.client("a")
    good = a.frame(a.submit())
    n = a.n_params
    bad_version = bytearray(good)
    bad_version[4] = 9
    cases: list[tuple[bytes, str]] = [
        (b"XXXX" + good[4:], "bad_frame"),  # malformed: bad magic
        (good[:10], "bad_frame"),  # truncated fixed header
        (good[:-5], "bad_frame"),  # truncated payload
        (bytes(bad_version), "unsupported_version"),  # wrong version
        (FIXED_HEADER.pack(MAGIC, 1, 4, 0, 2, 1 << 30) + b"{}", "frame_too_large"),
        (encode_frame(4, {"round": 0}), "bad_message"),  # missing fields
        (encode_frame(99, {}), "bad_message"),  # unknown message type
        (a.frame(a.submit(round=5)), "wrong_round"),
        (a.frame(a.submit(run_id="other")), "wrong_run"),
        (a.frame(a.submit(node_id=node_id("mallory"))), "unknown_node"),
        (a.frame(a.submit(length=7)), "bad_update"),  # wrong shape
        (a.frame(a.submit(payload=b"\0" * 12)), "bad_update"),  # payload/length mismatch
        (a.frame(a.submit(payload=raw32_unchecked(n, np.nan))), "bad_update"),  # NaN
        (a.frame(a.submit(payload=raw32_unchecked(n, np.inf))), "bad_update"),  # inf
        (a.frame(a.submit(codec="fp16")), "bad_update"),
        (a.submit().to_frame(), "bad_signature"),  # unsigned
        (a.frame(a.submit(), signer=identity("mallory")), "bad_signature"),  # another key
        (a.frame(a.submit(), round_=3), "bad_signature"),  # signed for another round
        (a.frame(a.submit(), run_id="other-run"), "bad_signature"),  # signed for another run
        (good[:-1] + bytes([good[-1] ^ 1]), "bad_signature"),  # tampered signature
        (good[:40] + bytes([good[40] ^ 1]) + good[41:], "bad_signature"),  # tampered header
    ]
    for data, code in cases:
        await a.send(data)
        await a.error(code)
    await a.ws.send_str("hello?")
    await a.error("bad_frame")
    # a stranger that never said hello
    b = await server.client("b", hello=False)
    await b.send(b.frame(a.submit(node_id=b.node_id)))
    await b.error("unknown_node")

    async with server.http.get(server.url + "/metrics") as resp:
        text = await resp.text()
    assert 'daa_rejected_total{code="bad_signature"} 6' in text
    assert "daa_rounds_committed 0" in text
    run = await server.api("/api/run")
    expected = len(cases) + 2
    assert run["rejected_total"] == expected, run["rejected"]
    assert run["rejected"]["bad_update"] == 5
    assert run["rejected"]["unknown_node"] == 2
    assert run["rejected"]["bad_signature"] == 6
    assert run["accepted"] == 0
    assert run["committed_rounds"] == 0
    assert run["round"] == 0
    assert sum("rejected" in r.message for r in caplog.records) == expected
    assert ckpt_hashes(tmp_path) == before
    # the same connection still works: a good update is accepted
    await a.send(good)
    ack = await a.expect(Ack)
    assert ack.status == "accepted"


async def test_oversized_websocket_message_is_counted(server: Server) -> None:
    coord = server.app[COORDINATOR]
    a = await server.client("a")
    with contextlib.suppress(ConnectionError):  # the server may hang up mid-message
        await a.ws.send_bytes(b"\0" * (coord.config.max_frame + 1))
        msg = await a.ws.receive(timeout=10)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert a.ws.close_code == 1009  # "message too big"
    for _ in range(100):  # the server counts it once its side of the socket has failed
        run = await server.api("/api/run")
        if run["rejected"].get("frame_too_large"):
            break
        await asyncio.sleep(0.05)
    assert run["rejected"].get("frame_too_large") == 1


async def test_resubmission_after_reconnect_counts_once(server: Server, tmp_path: Path) -> None:
    a = await server.client("a")
    b = await server.client("b")
    upd = a.submit()
    await a.send(upd)
    assert (await a.expect(Ack)).status == "accepted"
    await a.ws.close()  # a drops before the round closes, then comes back
    a2 = await server.client("a")
    assert a2.open is not None
    assert a2.open.round == 0
    await a2.send(dataclasses.replace(upd, nonce=new_nonce()))  # as the real client resends
    assert (await a2.expect(Ack)).status == "duplicate"
    # a DIFFERENT update from the same node for the same round is refused
    await a2.send(a2.submit(np.full(a2.n_params, 0.5, np.float32)))
    await a2.error("conflicting_update")
    await b.send(b.submit(np.full(b.n_params, 0.03, np.float32)))
    assert (await b.expect(Ack)).status == "accepted"
    committed = await a2.expect(RoundCommitted)
    assert committed.round == 0
    assert committed.n_updates == 2
    rounds = await server.api("/api/rounds")
    assert [r["n_updates"] for r in rounds] == [2]
    run_state = server.app[RUN]
    assert run_state.store.update_keys(0) == {a.node_id: upd.digest,
                                              b.node_id: b.submit(np.full(
                                                  b.n_params, 0.03, np.float32)).digest}
    # the outer step used the mean of the two updates (0.01 and 0.03 -> 0.02) with Nesterov
    opened = a2.open
    theta0 = np.frombuffer(opened.payload, "<f4")
    latest = np.frombuffer((await a2.expect(RoundOpen)).payload, "<f4")
    np.testing.assert_allclose(theta0 - latest, 0.7 * 1.9 * 0.02, rtol=1e-4)
    run = await server.api("/api/run")
    assert run["accepted"] == 2
    assert run["duplicates"] == 1


async def test_rest_endpoints_and_model_download(server: Server) -> None:
    a = await server.client("a")
    run = await server.api("/api/run")
    assert run["model"]["name"] == "mlp-digits"
    assert run["n_params"] == a.n_params
    assert run["status"] == "collecting"
    assert run["peers_connected"] == 1
    assert run["server_id"] == a.trust.server_id
    assert len(run["server_id"]) == 64
    peers = await server.api("/api/peers")
    assert peers[0]["node_id"] == a.node_id
    assert peers[0]["state"] == "training"
    async with server.http.get(server.url + "/model/latest.safetensors") as resp:
        assert resp.status == 200
        blob = await resp.read()
        digest = resp.headers["X-Params-SHA256"]
    header_len = struct.unpack("<Q", blob[:8])[0]
    assert b'"params"' in blob[8:8 + header_len]
    assert digest == a.opened.params_digest
    async with server.http.get(server.url + "/api/rounds?since=x") as resp:
        assert resp.status == 400


async def test_failed_commit_stops_the_loop_and_keeps_the_last_round(
        server: Server, tmp_path: Path) -> None:
    coord = server.app[COORDINATOR]
    ckpt = tmp_path / "run" / "checkpoints"
    before = ckpt_hashes(tmp_path)
    ckpt.rename(tmp_path / "moved")
    ckpt.write_text("not a folder")  # a real fault: the checkpoint cannot be written
    a, b = await server.client("a"), await server.client("b")
    for c in (a, b):
        await c.send(c.submit())
        assert (await c.expect(Ack)).status == "accepted"
    for _ in range(100):
        if coord.error is not None:
            break
        await asyncio.sleep(0.05)
    assert isinstance(coord.error, OSError)
    assert server.app[RUN].store.rounds() == []
    assert server.app[RUN].version == 0
    ckpt.unlink()
    (tmp_path / "moved").rename(ckpt)
    assert ckpt_hashes(tmp_path) == before


async def test_hello_must_prove_its_key_and_answer_this_connections_challenge(
        server: Server) -> None:
    a = await server.client("a", hello=False)
    other = await server.client("a2", hello=False)
    assert other.challenge is not None
    cases = [
        (a.frame(a.hello(challenge=other.challenge.challenge)), "bad_signature"),  # replayed
        (a.frame(a.hello(public_key=identity("mallory").public_key.hex())), "bad_signature"),
        (a.frame(a.hello(), signer=identity("mallory")), "bad_signature"),
        (a.hello().to_frame(), "bad_signature"),  # unsigned
    ]
    bad_key = {**dataclasses.asdict(a.hello()), "public_key": "zz"}
    assert a.challenge is not None
    cases.append((encode_frame(Hello.TYPE, bad_key, sign=a.ident.signer(
        run_id=a.challenge.run_id, round_=-1, msg_type=Hello.TYPE,
        nonce=bad_key["nonce"])), "bad_message"))
    for data, code in cases:
        await a.send(data)
        await a.error(code)
    await a.send(a.hello())
    assert isinstance(await a.recv(), Welcome)
    peers = await server.api("/api/peers")
    assert [p["node_id"] for p in peers] == [a.node_id]


async def test_a_replayed_frame_is_refused(server: Server) -> None:
    a = await server.client("a")
    data = a.frame(a.submit())
    await a.send(data)
    assert (await a.expect(Ack)).status == "accepted"
    await a.send(data)  # byte-identical copy: same nonce
    await a.error("replay")
    again = a.submit()  # the honest resubmission: same update, fresh nonce
    await a.send(again)
    assert (await a.expect(Ack)).status == "duplicate"
    run = await server.api("/api/run")
    assert run["rejected"] == {"replay": 1}
    assert run["accepted"] == 1


async def test_configured_robust_rule_is_applied(tmp_path: Path) -> None:
    async with serve(tmp_path, quorum=3, aggregator="median") as srv:
        clients = [await srv.client(name) for name in ("h1", "h2", "liar")]
        n = clients[0].n_params
        theta0 = np.frombuffer(clients[0].opened.payload, "<f4")
        for c, value in zip(clients, (0.01, 0.02, 1000.0), strict=True):
            await c.send(c.submit(np.full(n, value, np.float32)))
            assert (await c.expect(Ack)).status == "accepted"
        await clients[0].expect(RoundCommitted)
        theta1 = np.frombuffer((await clients[0].expect(RoundOpen)).payload, "<f4")
        # median of (0.01, 0.02, 1000) = 0.02; outer lr 1, no momentum: theta moves 0.02
        np.testing.assert_allclose(theta0 - theta1, 0.02, rtol=1e-4, atol=1e-6)


async def test_p2p_run_takes_ready_and_tabs_refuses_submits_and_checks_shards(
        tmp_path: Path) -> None:
    from shared.messages import SERVER, Ready, Shard, ShardPlan
    from shared.p2p import shard_bounds

    async with serve(tmp_path, quorum=2, aggregator="median", transport="p2p") as srv:
        tab = await srv.client("tab", hello=False)
        await tab.send(tab.hello(runtime="browser"))
        assert (await tab.expect(Welcome)).transport == "p2p"  # tabs join p2p runs (issue 25)
        await tab.ws.close()
        a, b = await srv.client("a"), await srv.client("b")
        assert a.welcome is not None
        assert a.open is not None
        assert a.welcome.transport == "p2p"
        assert a.open.with_momentum  # params + momentum
        await a.send(a.submit())
        assert (await a.error("bad_update")).field == "msg_type"  # the update stays home
        n = a.welcome.n_params
        short = np.zeros(n - 1, np.float32)
        await a.send(Ready(run_id=a.welcome.run_id, round=0, node_id=a.node_id, length=n - 1,
                           digest=sha256_hex(short.tobytes()), train_loss=None, samples=0,
                           compute_s=0.0))
        assert (await a.error("bad_update")).field == "length"  # wrong shape
        nowhere = Shard(run_id=a.welcome.run_id, round=0, node_id=a.node_id, to="ee" * 32,
                        kind="part", shard=0, revision=0, payload=b"\0" * 4)
        await a.send(nowhere)
        assert (await a.error("unknown_node")).field == "to"  # no such peer to relay to
        updates = {}
        for c, value in ((a, 0.01), (b, 0.03)):
            vec = np.full(n, value, np.float32)
            updates[c.node_id] = vec
            await c.send(Ready(run_id=a.welcome.run_id, round=0, node_id=c.node_id, length=n,
                               digest=sha256_hex(vec.tobytes()), train_loss=1.0, samples=4,
                               compute_s=0.1))
            assert (await c.expect(Ack)).status == "accepted"
        plan_msg = await a.expect(ShardPlan)
        assert sorted(plan_msg.plan["members"]) == sorted(updates)
        assert plan_msg.rule == "median"
        stranger = Shard(run_id=a.welcome.run_id, round=0, node_id=a.node_id, to=SERVER,
                         kind="part", shard=0, revision=0, payload=b"\0" * 4)
        await a.send(stranger)
        assert (await a.error("bad_update")).field == "kind"  # the server takes results only
        assert plan_msg.result_codec == "fp16"  # the default
        lo, hi = shard_bounds(n, 2, 0)
        wrong = Shard(run_id=a.welcome.run_id, round=0, node_id=a.node_id, to=SERVER,
                      kind="result", shard=0, revision=0,
                      payload=b"\x00" + b"\x00" * 2 * (hi - lo))  # raw32's id, fp16's size
        await a.send(wrong)
        err = await a.error("bad_update")
        assert err.field == "payload"
        assert "expected 'fp16'" in err.message
        assert (await srv.api("/api/run"))["p2p"]["malformed"] == 1
        async with srv.http.get(srv.url + "/metrics") as resp:
            assert 'daa_p2p_total{event="malformed"} 1' in await resp.text()
        assert (await srv.api("/api/rounds")) == []  # nothing committed by bad input


async def test_ready_is_refused_outside_p2p_runs(server: Server) -> None:
    from shared.messages import Ready

    c = await server.client("a")
    assert c.welcome is not None
    vec = np.zeros(c.welcome.n_params, np.float32)
    await c.send(Ready(run_id=c.welcome.run_id, round=0, node_id=c.node_id,
                       length=c.welcome.n_params, digest=sha256_hex(vec.tobytes()),
                       train_loss=None, samples=0, compute_s=0.0))
    assert (await c.error("bad_update")).field == "msg_type"
    assert (await server.api("/api/run"))["updates_in_round"] == 0
