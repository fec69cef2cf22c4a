"""Run inside a private network namespace by tests/test_dht_live.py: a real `python -m server
--dht` and a few nodes (shared.participant for the protocol, native_node.mesh for data
channels, native_node.dht for the DHT carrier) that populate their DHT through the server (its
DHT node is their bootstrap, its relay their only path), open data channels to their DHT
contacts, and then, with the server killed, look each other up over those channels alone.
`python -m tests.dht_live_scenario DIR NODES`; prints JSON last."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import free_port, get_json, poll
from native_node.dht import NodeDht
from native_node.mesh import PeerMesh
from shared.dht import DhtConfig
from shared.participant import Participant
from tests.conftest import Procs
from transport.identity import load_or_create_identity

# frequent maintenance for a test; RPCs through the relay cost two ML-DSA signatures per
# message (node and server), made by 4 nodes on one event loop here: 4 s before a retry
# bootstrap_s stays at its 300 s default: the restarted server refills because a node pings
# it on its new Welcome (DhtCarrier.relay_restored), not because a timer came round
CONFIG = DhtConfig(rpc_timeout_s=4.0, maintenance_s=2.0)


class DhtNodeProc:
    """The protocol handshake of a node, its mesh and its DHT carrier; it never trains."""

    def __init__(self, state: Path, port: int) -> None:
        self.ident = load_or_create_identity(state)
        self.id = self.ident.node_id
        self.part = Participant(self.ident, runtime="native", agent="dht-scenario",
                                device="cpu")
        self.port = port
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.joined = asyncio.Event()
        self.mesh = PeerMesh(self.id, self.send_signal, self.on_frame, timeout_s=15)
        self.dht: NodeDht | None = None

    async def send_signal(self, to: str, kind: str, data: str) -> None:
        await self.act(self.part.signal(kind, data, to=to))

    def on_frame(self, peer: str, frame: bytes) -> None:
        assert self.dht is not None
        self.dht.on_direct(peer, frame)

    async def send_frame(self, frame: bytes) -> None:
        if self.ws is None or self.ws.closed:
            raise ConnectionError("the control WebSocket is closed")
        await self.ws.send_bytes(frame)

    async def act(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            if e["kind"] == "send" and self.ws is not None:
                await self.ws.send_bytes(e["frame"])
            elif e["kind"] == "welcome" and self.dht is not None:  # again, after a restart
                self.dht.relay_restored()
                self.joined.set()
            elif e["kind"] == "welcome":
                self.dht = NodeDht(self.ident, e["run_id"], send_frame=self.send_frame,
                                   sign=self.part.frame, mesh=self.mesh, config=CONFIG)
                self.dht.start()
                self.joined.set()
            elif e["kind"] == "signal":
                await self.mesh.on_signal(e["from"], e["signal"], e["data"])
            elif e["kind"] == "dht" and self.dht is not None:
                self.dht.on_relayed(e["message"])

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Connected to the server whenever it is up (a node reconnects)."""
        while True:
            try:
                async with session.ws_connect(f"ws://127.0.0.1:{self.port}/ws",
                                              max_msg_size=0) as ws:
                    self.ws = ws
                    self.part.connection_made()
                    async for msg in ws:
                        if msg.type == aiohttp.WSMsgType.BINARY:
                            await self.act(self.part.receive(msg.data))
            except (aiohttp.ClientError, OSError):
                pass
            if self.dht is not None:
                self.dht.relay_up = False  # the server is gone: channels only
            self.joined.clear()
            await asyncio.sleep(0.5)


async def lookups(nodes: list[DhtNodeProc]) -> dict[str, Any]:
    """Every node looks up every other; how many found the target itself, and hops."""
    pairs = [(a, b) for a in nodes for b in nodes if a is not b]
    t0 = time.monotonic()
    results = await asyncio.gather(*(a.dht.find(b.id) for a, b in pairs))  # type: ignore[union-attr]
    return {"lookups": len(results), "found": sum(r.found for r in results),
            "hops_max": max((r.hops or 0) for r in results),
            "s": round(time.monotonic() - t0, 2)}


def counters(nodes: list[DhtNodeProc]) -> dict[str, int]:
    total: dict[str, int] = {}
    for n in nodes:
        assert n.dht is not None
        for k, v in n.dht.counters.items():
            total[k] = total.get(k, 0) + v
    return total


async def scenario(tmp: Path, port: int, n: int, procs: Procs) -> dict[str, Any]:
    nodes = [DhtNodeProc(tmp / f"n{i}", port) for i in range(n)]
    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {"nodes": n}
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(x.run(session)) for x in nodes]
        try:
            await asyncio.wait_for(asyncio.gather(*(x.joined.wait() for x in nodes)), 60)
            # populate: each table fills through the server (bootstrap + relay)
            want = n - 1
            await asyncio.wait_for(_until(lambda: all(len(x.dht.contacts()) >= want  # type: ignore[union-attr]
                                                      for x in nodes)), 60)
            out["server_dht"] = get_json(base + "/api/run")["dht"]
            out["before"] = await lookups(nodes)
            out["before_counters"] = counters(nodes)
            opened = await asyncio.gather(*(x.dht.connect_contacts() for x in nodes))  # type: ignore[union-attr]
            out["channels"] = list(opened)
            procs.kill_all()  # the server goes away without notice
            await asyncio.wait_for(_until(lambda: not any(
                x.dht.relay_up for x in nodes)), 30)  # type: ignore[union-attr]
            out["relay_up"] = [x.dht.relay_up for x in nodes]  # type: ignore[union-attr]
            mark = counters(nodes)
            out["after"] = await lookups(nodes)
            after = counters(nodes)
            out["after_counters"] = {k: after.get(k, 0) - mark.get(k, 0) for k in after}
            # the server comes back (same run, same port) with an empty DHT table: the nodes
            # reconnect and their bootstrap pings fill it again
            await asyncio.to_thread(start_server, procs, tmp, port)
            t0 = time.monotonic()
            while await asyncio.to_thread(_server_contacts, base) < n:
                if time.monotonic() - t0 > 60:
                    break
                await asyncio.sleep(0.5)
            out["server_refilled_s"] = round(time.monotonic() - t0, 1)
            out["server_dht_after_restart"] = get_json(base + "/api/run")["dht"]
        finally:
            for x in nodes:
                if x.dht is not None:
                    await x.dht.close()
                await x.mesh.close()
                if x.ws is not None:
                    await x.ws.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return out


def _server_contacts(base: str) -> int:
    try:
        dht = get_json(base + "/api/run")["dht"]
    except (OSError, ValueError):
        return 0
    return int(dht["contacts"]) if dht else 0


def start_server(procs: Procs, tmp: Path, port: int) -> None:
    procs.server("server", tmp / "run", port, "--model", "mlp-digits", "--quorum", "100",
                 "--rounds", "1", "--deadline-s", "600", "--dht")
    poll(lambda: get_json(f"http://127.0.0.1:{port}/api/run"), 60, "the server")


async def _until(cond: Any) -> None:
    while not cond():
        await asyncio.sleep(0.2)


def main() -> int:
    tmp, n = Path(sys.argv[1]), int(sys.argv[2])
    procs = Procs(tmp)
    port = free_port()
    try:
        start_server(procs, tmp, port)
        out = asyncio.run(scenario(tmp, port, n, procs))
    finally:
        procs.kill_all()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
