"""Run inside a private network namespace by tests/test_mesh.py: a real server and two
minimal nodes (shared.participant for the protocol, native_node.mesh for the links) that open
a direct data channel through the server's Signal forwarding and swap frames over it.
`python -m tests.mesh_scenario DIR TIMEOUT_S`; prints JSON last."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import free_port, get_json, poll
from native_node.mesh import PeerMesh
from shared.participant import Participant
from tests.conftest import Procs
from transport.identity import load_or_create_identity


class MiniNode:
    """The protocol handshake of a node and its mesh; it never trains."""

    def __init__(self, state: Path, port: int, timeout_s: float) -> None:
        self.ident = load_or_create_identity(state)
        self.id = self.ident.node_id
        self.part = Participant(self.ident, runtime="native", agent="mesh-scenario",
                                device="cpu")
        self.port = port
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.joined = asyncio.Event()
        self.got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.mesh = PeerMesh(self.id, self.send_signal, self.on_frame, timeout_s=timeout_s)

    async def send_signal(self, to: str, kind: str, data: str) -> None:
        await self.act(self.part.signal(kind, data, to=to))

    def on_frame(self, peer: str, frame: bytes) -> None:
        self.got.put_nowait((peer, frame))

    async def act(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            if e["kind"] == "send" and self.ws is not None:
                await self.ws.send_bytes(e["frame"])
            elif e["kind"] == "welcome":
                self.joined.set()
            elif e["kind"] == "signal":
                await self.mesh.on_signal(e["from"], e["signal"], e["data"])

    async def run(self, session: aiohttp.ClientSession) -> None:
        async with session.ws_connect(f"ws://127.0.0.1:{self.port}/ws",
                                      max_msg_size=0) as ws:
            self.ws = ws
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    await self.act(self.part.receive(msg.data))


async def scenario(tmp: Path, port: int, timeout_s: float) -> dict[str, Any]:
    a, b = (MiniNode(tmp / name, port, timeout_s) for name in ("a", "b"))
    if b.id < a.id:
        a, b = b, a  # a offers (the smaller id)
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(n.run(session)) for n in (a, b)]
        try:
            await asyncio.wait_for(asyncio.gather(a.joined.wait(), b.joined.wait()), 30)
            t0 = time.monotonic()
            opened = await asyncio.gather(a.mesh.connect(b.id), b.mesh.connect(a.id))
            out["opened"] = list(opened)
            out["connect_s"] = round(time.monotonic() - t0, 2)
            if all(opened):
                frame = os.urandom(3_000_000)
                t1 = time.monotonic()
                assert await a.mesh.send(b.id, frame)
                peer, got = await asyncio.wait_for(b.got.get(), 60)
                out["a_to_b"] = {"from_a": peer == a.id, "same": got == frame,
                                 "MBps": round(3 / (time.monotonic() - t1), 2)}
                back = hashlib.sha256(got).digest()
                assert await b.mesh.send(a.id, back)
                peer, echo = await asyncio.wait_for(a.got.get(), 60)
                out["b_to_a"] = {"from_b": peer == b.id, "digest_ok": echo == back}
            else:
                out["send_without_channel"] = await a.mesh.send(b.id, b"x")
                out["failed"] = [b.id in a.mesh.failed, a.id in b.mesh.failed]
        finally:
            for n in (a, b):
                await n.mesh.close()
                if n.ws is not None:
                    await n.ws.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return out


def main() -> int:
    tmp, timeout_s = Path(sys.argv[1]), float(sys.argv[2])
    procs = Procs(tmp)
    port = free_port()
    try:
        procs.server("server", tmp / "run", port, "--model", "mlp-digits", "--quorum", "2",
                     "--rounds", "1", "--deadline-s", "600")
        poll(lambda: get_json(f"http://127.0.0.1:{port}/api/run"), 60, "the server")
        out = asyncio.run(scenario(tmp, port, timeout_s))
    finally:
        procs.kill_all()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
