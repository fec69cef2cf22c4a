"""The composed coordinator: update guards in one place with typed errors, the reduction
chosen once from `transport`, and no mixins (in-process: real coordinator, run and store,
frames through `handle_frame` over an in-memory sender)."""

from __future__ import annotations

import ast
import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.coordinator import Coordinator
from server.p2p import P2PReduction
from server.peers import Connection
from server.reduction import ServerReduction
from server.runstate import open_run
from shared.codecs import get_codec
from shared.envelope import Identity, new_nonce
from shared.frame import decode_frame
from shared.messages import (
    SERVER,
    Ack,
    Challenge,
    Error,
    Hello,
    Message,
    Ready,
    RoundOpen,
    Shard,
    Submit,
    Welcome,
    message_from_frame,
    sha256_hex,
)

SERVER_DIR = Path(__file__).resolve().parents[1] / "server"


class Inbox:
    """server.peers.Sender over memory: what the coordinator sends lands in `frames`."""

    def __init__(self) -> None:
        self.frames: list[Message] = []

    async def send_bytes(self, data: bytes) -> None:
        self.frames.append(message_from_frame(decode_frame(data), max_payload=1 << 26))

    async def close(self) -> None:
        return None


class Node:
    def __init__(self, coord: Coordinator) -> None:
        self.coord, self.ident, self.inbox = coord, Identity.generate(), Inbox()
        self.conn = Connection(ws=self.inbox, remote="test")
        self.n = coord.run.n_params

    async def send(self, msg: Message) -> None:
        data = msg.to_frame(sign=self.ident.signer(
            run_id=self.coord.run.run_id, round_=getattr(msg, "round", -1), msg_type=msg.TYPE,
            nonce=msg.nonce))
        await self.coord.handle_frame(self.conn, data)

    @classmethod
    async def join_new(cls, coord: Coordinator, **over: Any) -> Node:
        node = cls(coord)
        await node.join(**over)
        return node

    async def join(self, **over: Any) -> None:
        await self.coord.greet(self.conn)
        challenge = self.inbox.frames[-1]
        assert isinstance(challenge, Challenge)
        await self.send(Hello(**{
            "node_id": self.ident.node_id, "public_key": self.ident.public_key.hex(),
            "challenge": challenge.challenge, "nonce": new_nonce(), "runtime": "native",
            "agent": "test", "device": "cpu", **over}))
        assert any(isinstance(m, Welcome) for m in self.inbox.frames), self.inbox.frames

    def submit(self, **over: Any) -> Submit:
        payload = over.pop("payload", get_codec("raw32").encode(np.full(self.n, 0.01,
                                                                         np.float32)))
        return Submit(**{"run_id": self.coord.run.run_id, "round": 0,
                         "node_id": self.ident.node_id, "nonce": new_nonce(), "codec": "raw32",
                         "length": self.n, "digest": sha256_hex(payload), "train_loss": 1.0,
                         "samples": 4, "compute_s": 0.1, "payload": payload, **over})

    def ready(self, **over: Any) -> Ready:
        return Ready(**{"run_id": self.coord.run.run_id, "round": 0,
                        "node_id": self.ident.node_id, "length": self.n,
                        "digest": "ab" * 32, "train_loss": None, "samples": 0,
                        "compute_s": 0.0, **over})

    def last(self) -> Message:
        return self.inbox.frames[-1]

    def error(self) -> Error:
        err = self.last()
        assert isinstance(err, Error), err
        return err


@asynccontextmanager
async def coordinator(tmp_path: Path, *, loop: bool = True, **config: Any
                      ) -> AsyncIterator[Coordinator]:
    run = open_run(tmp_path / "run", {"model": "mlp-digits", "quorum": 2, "deadline_s": 60.0,
                                      **config})
    coord = Coordinator(run)
    task = asyncio.create_task(coord.run_rounds()) if loop else None
    try:
        if loop:  # poll (with a deadline) for the first round to open
            deadline = asyncio.get_running_loop().time() + 30
            while coord.state is None:
                assert asyncio.get_running_loop().time() < deadline, "no round opened"
                await asyncio.sleep(0.01)
        yield coord
    finally:
        while task is not None and not task.done():  # wait_for (3.11) may swallow a cancel
            task.cancel()
            await asyncio.wait([task], timeout=0.1)


async def test_an_update_with_no_round_open_is_a_wrong_round(tmp_path: Path) -> None:
    async with coordinator(tmp_path, loop=False) as coord:  # the round loop never started
        a = await Node.join_new(coord)
        for msg in (a.submit(), a.ready()):
            await a.send(msg)
            err = a.error()
            assert (err.code, err.field) == ("wrong_round", "round")
            assert "no round is open" in err.message
        assert coord.rejected == {"wrong_round": 2}
        assert coord.counters["accepted"] == 0


@pytest.mark.parametrize(("transport", "make", "field"), [
    ("ws", lambda a: a.ready(), "msg_type"),  # a Ready where updates are submitted
    ("p2p", lambda a: a.submit(), "msg_type"),  # a Submit where they stay home
    ("ws", lambda a: a.submit(codec="fp16"), "codec"),
    ("ws", lambda a: a.submit(length=7), "length"),
    ("p2p", lambda a: a.ready(length=7), "length"),
])
async def test_the_guards_refuse_with_the_field_at_fault(tmp_path: Path, transport: str,
                                                         make: Any, field: str) -> None:
    cfg: dict[str, Any] = {"transport": transport}
    if transport == "p2p":
        cfg["aggregator"] = "median"
    async with coordinator(tmp_path, **cfg) as coord:
        a = await Node.join_new(coord)
        assert isinstance(a.inbox.frames[-1], RoundOpen)
        await a.send(make(a))
        err = a.error()
        assert (err.code, err.field) == ("bad_update", field), err
        assert coord.state is not None
        assert coord.state.updates == {}
        assert coord.collection.rows == {}
        assert coord.collection.vectors == {}


async def test_a_validator_does_not_submit_and_a_trainer_does(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as coord:
        v = await Node.join_new(coord, role="validator")
        await v.send(v.submit())
        assert (v.error().code, v.error().field) == ("bad_update", "node_id")
        a = await Node.join_new(coord)
        await a.send(a.submit())
        ack = a.last()
        assert isinstance(ack, Ack)
        assert ack.status == "accepted"
        assert coord.collection.vectors[a.ident.node_id].dtype == np.float32
        assert coord.collection.rows[a.ident.node_id].bytes == len(a.submit().payload)
        await a.send(a.submit())  # the same update again (fresh nonce): counted once
        ack = a.last()
        assert isinstance(ack, Ack)
        assert ack.status == "duplicate"
        assert coord.counters["accepted"] == 1
        assert coord.counters["duplicates"] == 1


async def test_a_p2p_run_keeps_rows_but_no_vectors(tmp_path: Path) -> None:
    async with coordinator(tmp_path, transport="p2p", aggregator="median") as coord:
        assert isinstance(coord.reduction, P2PReduction)
        a = await Node.join_new(coord)
        await a.send(a.ready())
        ack = a.last()
        assert isinstance(ack, Ack)
        assert ack.status == "accepted"
        assert coord.collection.vectors == {}
        assert coord.collection.payloads == {}
        assert coord.collection.rows[a.ident.node_id].bytes == 4 * a.n


async def test_a_shard_in_a_run_that_does_not_reduce_peer_to_peer(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as coord:
        assert isinstance(coord.reduction, ServerReduction)
        a = await Node.join_new(coord)
        await a.send(Shard(run_id=coord.run.run_id, round=0, node_id=a.ident.node_id,
                           to=SERVER, kind="result", shard=0, revision=0, payload=b"\0" * 4))
        assert (a.error().code, a.error().field) == ("bad_update", "msg_type")


def test_no_class_in_server_inherits_a_mixin() -> None:
    for path in sorted(SERVER_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b) for b in node.bases]
                assert not any("Mixin" in b for b in bases), (path.name, node.name, bases)
                assert "Mixin" not in node.name, (path.name, node.name)


async def test_frames_past_the_refusal_limit_close_the_connection_unanswered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames that reach the coordinator by another path than server.ws (a star data channel)
    meet the same limit, server.peers.close_reason: every refusal up to it is answered, the
    next closes the connection with no Error."""
    monkeypatch.setattr("server.peers.MAX_REFUSALS", 4)
    closed: list[bool] = []

    async def close() -> None:
        closed.append(True)

    async with coordinator(tmp_path, loop=False) as coord:
        a = await Node.join_new(coord)
        a.inbox.close = close  # type: ignore[method-assign]
        before = len(a.inbox.frames)
        for _ in range(4):
            await a.send(a.submit())  # no round open: wrong_round, answered
        assert [type(m) for m in a.inbox.frames[before:]] == [Error] * 4
        assert not closed
        await a.send(a.submit())
        await asyncio.sleep(0)  # the close runs in the background
        assert closed == [True]
        assert len(a.inbox.frames) == before + 4  # the fifth refusal is not answered
        assert coord.rejected == {"wrong_round": 5}
