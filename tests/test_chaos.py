"""Fault tolerance: the pending-update journal, the netfault relay, and a real-process chaos run.

The chaos test kills -9 a node and the server at the same instant, while the open round holds
that node's accepted update, restarts both, and checks that the run reaches its last round
with no committed round lost or changed, every update counted once, and the killed node's
journaled update (not a retrained one) counted for the interrupted round.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bench.common import free_port, get_json
from bench.netfault import Relay, RelayThread
from native_node import journal
from native_node.client import NodeClient, NodeOptions
from shared.envelope import Identity
from shared.messages import Submit, sha256_hex
from shared.participant import Participant
from tests.conftest import Procs, wait_for

# -- journal ------------------------------------------------------------------------------


def _participant(identity: Identity, round_: int = 3,
                 payload: bytes = b"\x01\x02" * 50) -> Participant:
    """A participant holding a pending update for `round_`, as after its Submit."""
    p = Participant(identity, runtime="native", agent="test", device="cpu")
    p.pending = Submit(run_id="run-1", round=round_, node_id=identity.node_id, codec="raw32",
                       length=25, digest=sha256_hex(payload), train_loss=1.25, samples=320,
                       compute_s=0.5, payload=payload)
    p.pending_params = "ab" * 32
    return p


@pytest.fixture(scope="module")
def ident() -> Identity:
    return Identity.generate()


def test_journal_round_trip_is_atomic(tmp_path: Path, ident: Identity) -> None:
    """The file holds the participant's own entry (the one journal format of every runtime)."""
    assert journal.load(tmp_path) is None
    first = _participant(ident)
    entry = first.journal_entry()
    assert entry is not None
    journal.save(tmp_path, entry)
    assert sorted(p.name for p in tmp_path.iterdir()) == [journal.FILENAME]  # no temp left
    assert (tmp_path / journal.FILENAME).stat().st_mode & 0o777 == 0o600
    back = Participant(ident, runtime="native", agent="test", device="cpu")
    assert back.restore(journal.load(tmp_path) or "")
    assert back.pending == first.pending
    assert back.pending_params == "ab" * 32
    journal.save(tmp_path, _participant(ident, round_=4).journal_entry() or "")  # replaces
    again = Participant(ident, runtime="native", agent="test", device="cpu")
    assert again.restore(journal.load(tmp_path) or "")
    assert again.pending is not None
    assert again.pending.round == 4
    journal.clear(tmp_path)
    journal.clear(tmp_path)  # idempotent
    assert journal.load(tmp_path) is None


@pytest.mark.parametrize("damage", ["truncated", "payload", "header", "empty", "binary",
                                    "foreign"])
def test_damaged_or_foreign_journal_is_refused_and_dropped_at_start(
        tmp_path: Path, ident: Identity, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    entry = _participant(ident).journal_entry() or ""
    if damage == "truncated":
        entry = entry[:20]
    elif damage == "payload":  # the Submit's digest check catches it
        doc = json.loads(entry)
        doc["payload"] = base64.b64encode(b"\x09" * 100).decode()
        entry = json.dumps(doc)
    elif damage == "header":
        entry = "{" + entry
    elif damage == "empty":
        entry = ""
    elif damage == "foreign":
        entry = _participant(Identity.generate()).journal_entry() or ""
    path = tmp_path / journal.FILENAME
    if damage == "binary":
        path.write_bytes(b"DAAPJNL1\xff\xfe")  # the old binary format: not UTF-8 text
    else:
        journal.save(tmp_path, entry)
    with caplog.at_level(logging.WARNING, logger="native_node.journal"):
        client = NodeClient(NodeOptions(coordinator="127.0.0.1:1", identity=ident,
                                        state_dir=tmp_path))
    assert client.part.pending is None
    assert "ignoring the pending-update journal" in caplog.text
    assert not path.exists()  # dropped: the next start does not trip over it again


# -- netfault relay -----------------------------------------------------------------------


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    """An upstream WebSocket server that echoes every message back (and greets first)."""

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(b"hello")
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"127.0.0.1:{port}"
    await runner.cleanup()


async def test_relay_forwards_whole_messages_both_ways(echo: str) -> None:
    relay = Relay(echo, seed=1)
    port = await relay.start()
    try:
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            assert (await ws.receive_bytes(timeout=5)) == b"hello"
            big = os.urandom(3 * 1024 * 1024)  # several TCP segments, one message
            await ws.send_bytes(big)
            assert (await ws.receive_bytes(timeout=10)) == big
            await ws.send_str("text too")
            assert (await ws.receive_str(timeout=5)) == "text too"
        assert relay.stats["forwarded_up"] == 2
        assert relay.stats["forwarded_down"] == 3
        assert relay.stats["dropped_up"] == relay.stats["dropped_down"] == 0
    finally:
        await relay.close()


async def _receive_until_quiet(ws: aiohttp.ClientWebSocketResponse, got: set[int]) -> None:
    """Collect the echoed numbers; the "end" echo or a 1 s silence raises TimeoutError."""
    while True:
        msg = await ws.receive(timeout=1.0)
        if msg.type == aiohttp.WSMsgType.BINARY:
            got.add(int.from_bytes(msg.data, "little"))
        elif msg.type != aiohttp.WSMsgType.TEXT:
            return
        else:
            raise TimeoutError


async def _lossy_echo(echo: str, seed: int, n: int, drop: float) -> tuple[set[int], Relay]:
    relay = Relay(echo, seed=seed)
    port = await relay.start()
    got: set[int] = set()
    try:
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            assert (await ws.receive_bytes(timeout=5)) == b"hello"
            relay.set_fault(drop=drop, delay_s=0.0)
            for i in range(n):
                await ws.send_bytes(i.to_bytes(4, "little"))
            await ws.send_str("end")  # may itself be dropped: then the timeout ends the wait
            with pytest.raises(TimeoutError):
                await _receive_until_quiet(ws, got)
    finally:
        await relay.close()
    return got, relay


async def test_relay_drops_the_configured_fraction_reproducibly(echo: str) -> None:
    n, drop = 1000, 0.1
    got, relay = await _lossy_echo(echo, seed=7, n=n, drop=drop)
    st = relay.stats
    sent_draws = n + 1  # + the "end" marker
    assert st["forwarded_up"] + st["dropped_up"] == sent_draws
    assert st["forwarded_down"] + st["dropped_down"] == 1 + st["forwarded_up"]  # + hello
    lost = n - len(got)
    # both hops can lose a message: expected loss 1 - 0.9**2 = 19%
    assert 0.13 * n <= lost <= 0.25 * n, lost
    assert 0.06 <= st["dropped_up"] / sent_draws <= 0.14, dict(st)
    again, _ = await _lossy_echo(echo, seed=7, n=n, drop=drop)
    assert again == got  # one RNG draw per message in arrival order: a seed fixes the pattern
    other, _ = await _lossy_echo(echo, seed=8, n=n, drop=drop)
    assert other != got


def test_relay_thread_refuses_when_upstream_is_down() -> None:
    relay = RelayThread(f"127.0.0.1:{free_port()}", seed=0)
    port = relay.start()
    try:
        async def connect() -> None:
            async with aiohttp.ClientSession() as http:
                await http.ws_connect(f"ws://127.0.0.1:{port}/ws")

        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            asyncio.run(connect())
        assert info.value.status == 502  # as unreachable as the server itself
        assert relay.stats["upstream_refused"] == 1
        with pytest.raises(ValueError, match=r"drop must be in \[0, 1\]"):
            relay.relay.set_fault(drop=1.5)
    finally:
        relay.stop()


# -- real processes -----------------------------------------------------------------------

FAST = ("--model", "mlp-digits", "--inner-steps", "20", "--batch-size", "32")


def _node_id(log: str) -> str:
    return log.split("node id ", 1)[1].split()[0]


def _db(data: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(data / "run.sqlite") as db:
        return list(db.execute(sql))


def test_node_and_server_killed_together_resume_without_loss_or_double_count(
        procs: Procs, tmp_path: Path) -> None:
    port, rounds, data = free_port(), 7, tmp_path / "run"
    base = f"http://127.0.0.1:{port}"
    # quorum = all 3 nodes: the interrupted round cannot commit without the killed node
    flags = (*FAST, "--quorum", "3", "--deadline-s", "20", "--rounds", str(rounds))
    server = procs.server("server1", data, port, *flags)
    nodes = [procs.node(f"n{i}", port) for i in range(3)]
    wait_for(lambda: get_json(base + "/api/run")["committed_rounds"] >= 2, 60, "2 rounds")
    # SIGSTOP one node so that the next round stays open (quorum 3) with the others' updates
    stalled = nodes[2]
    stalled.send_signal(signal.SIGSTOP)
    stalled_id = _node_id(procs.log("n2"))

    def open_with_update() -> tuple[str, int] | None:
        run = get_json(base + "/api/run")
        peers = {p["node_id"]: p["state"] for p in get_json(base + "/api/peers")}
        done = [n for n, st in peers.items() if st == "submitted" and n != stalled_id]
        if run["status"] == "collecting" and peers.get(stalled_id) != "submitted" and done:
            return done[0], int(run["round"])
        return None

    victim_id, open_round = wait_for(open_with_update, 60, "an open round holding an update")
    victim = next(i for i in range(2) if victim_id in procs.log(f"n{i}"))
    before = _db(data, "SELECT round, params_digest FROM rounds ORDER BY round")
    assert len(before) == open_round
    for proc in (nodes[victim], server):  # the same instant: a power cut
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    stalled.send_signal(signal.SIGCONT)
    state = tmp_path / f"n{victim}"
    text = journal.load(state)
    pending = json.loads(text)["submit"] if text is not None else None
    durable = _db(data, "SELECT round, params_digest FROM rounds ORDER BY round")
    assert durable[:len(before)] == before  # what was committed before the kill is on disk
    procs.server("server2", data, port)  # same data dir, stored config
    procs.node(f"n{victim}", port)
    wait_for(lambda: get_json(base + "/api/run")["status"] == "finished", 90,
             f"the run to finish after the restart (logs in {tmp_path})")
    after = _db(data, "SELECT round, params_digest FROM rounds ORDER BY round")
    assert [r for r, _ in after] == list(range(rounds))  # no gap, none twice
    assert after[:len(durable)] == durable  # no committed round lost or re-committed
    per_node = _db(data, "SELECT round, node_id, COUNT(*) FROM updates GROUP BY round, node_id")
    assert all(c == 1 for _, _, c in per_node), per_node
    n_up = dict(_db(data, "SELECT round, n_updates FROM rounds"))
    distinct = dict(_db(data, "SELECT round, COUNT(DISTINCT node_id) FROM updates "
                              "GROUP BY round"))
    assert n_up == distinct, n_up
    assert all(n == 3 for n in n_up.values()), n_up
    # the killed node resubmitted its journaled update for the interrupted round
    assert pending is not None
    assert pending["round"] == open_round == len(durable)
    assert pending["node_id"] == victim_id
    row = _db(data, f"SELECT digest FROM updates WHERE round = {open_round} "
                    f"AND node_id = '{victim_id}'")
    assert row == [(pending["digest"],)]
    log = procs.log(f"n{victim}")
    assert f"journal: an update for round {open_round} survived the restart" in log
    assert f"round {open_round}: resubmitting" in log
    wait_for(lambda: not (state / journal.FILENAME).exists(), 10,
             "the journal to be cleared once a commit covered it")
