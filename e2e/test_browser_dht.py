"""A browser tab in the Kademlia DHT (docs/dht.md, "Carriers"; browser/node/dht_glue.py +
dht.js): the tab runs the same shared/dht node and carrier (shared/dht/carrier.py) as a native
node, in Pyodide, with its record signed by its ML-DSA-65 identity. A real server with `dht`
is the bootstrap and the relay; a real `python -m native_node join --dht` trains beside the
tab, and a second native DHT node (native_node.dht.NodeDht with its PeerMesh, the same
harness as tests/test_dht_live.py, in this process so the test can ask it for lookups) joins
too. The tab finds both native nodes by lookup, and the native node finds the tab and the other
node, all through the server's relay (this run has no data channels: Chromium needs an
interface besides loopback for WebRTC)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from transport.identity import load_or_create_identity

RUN = {"model": "mlp-digits", "dht": True, "inner_steps": 5, "batch_size": 16, "quorum": 2,
       "rounds": 100, "deadline_s": 60.0}


def api(server: Any, path: str) -> Any:
    with urllib.request.urlopen(f"{server.url}{path}", timeout=10) as resp:
        return json.loads(resp.read())


class InProcessNode:
    """tests.dht_live_scenario.DhtNodeProc (participant handshake + PeerMesh + NodeDht) on
    its own event loop in a thread."""

    def __init__(self, state: Path, port: int) -> None:
        from tests.dht_live_scenario import DhtNodeProc

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dht-node",
                                       daemon=True)
        self.thread.start()

        async def make() -> Any:
            node = DhtNodeProc(state, port)
            self.session = aiohttp.ClientSession()
            self.task = asyncio.create_task(node.run(self.session))
            return node

        self.node = self.call(make())

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def contacts(self) -> list[str]:
        async def get() -> list[str]:
            dht = self.node.dht
            return list(dht.contacts()) if dht is not None and dht.service is not None else []
        return list(self.call(get()))

    def close(self) -> None:
        async def stop() -> None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            if self.node.dht is not None:
                await self.node.dht.close()
            await self.node.mesh.close()
            await self.session.close()
        with contextlib.suppress(Exception):
            self.call(stop(), timeout=20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def inprocess_node(tmp_path: Path) -> Iterator[Any]:
    nodes: list[InProcessNode] = []

    def start(port: int) -> InProcessNode:
        n = InProcessNode(tmp_path / f"inproc{len(nodes)}", port)
        nodes.append(n)
        return n

    try:
        yield start
    finally:
        for n in nodes:
            n.close()


@pytest.mark.timeout(180)
def test_a_tab_finds_native_nodes_and_they_find_it_through_the_relay(
        make_server: Any, native_node: Any, open_tab: Any, inprocess_node: Any,
        tmp_path: Path) -> None:
    server = make_server(RUN)
    cli_id = load_or_create_identity(tmp_path / "native0").node_id  # the fixture's state dir
    cli = native_node(server, "--dht")
    inproc = inprocess_node(server.port)
    tab = open_tab(f"{server.url}/?backend=wasm", "dht")
    # the tab's table fills through the server: its node (the bootstrap) and both natives
    tab.wait("s.dht && s.dht.contacts >= 3", timeout_s=120)
    tab_id = tab.stats()["nodeId"]
    native_ids = [cli_id, inproc.node.id]
    for target in native_ids:
        r = tab.page.evaluate("(id) => window.daaNode.dhtFind(id)", target)
        assert r["found"], r
        assert (r["hops"] or 0) >= 1, r
        print(f"tab -> {target[:12]}: {r}")  # shown with -s
    # the native node finds the tab, and the other native node, by lookup
    found = inproc.call(inproc.node.dht.find(tab_id))
    assert found.found, found
    assert inproc.call(inproc.node.dht.find(cli_id)).found
    tab.wait("s.dht.lookups === 2", timeout_s=10)  # the card's summary: every SYNC_MS
    d = tab.stats()["dht"]
    assert d["found"] == 2, d
    assert min(d["relay_out"], d["relay_in"]) > 0, d
    assert (d["direct_out"], d["channels"]) == (0, 0), d  # no data channel in this run
    # the card's line says it
    tab.page.wait_for_function(
        "() => (document.getElementById('node-dht')?.textContent || '').includes('2 / 2 found')",
        timeout=10_000)
    tab.screenshot("dht-tab")
    # the server's node holds all three, and it relayed their messages
    view = api(server, "/api/run")["dht"]
    assert view["contacts"] >= 3, view
    assert view.get("relayed", 0) > 0, view
    assert cli.proc.poll() is None, cli.log.read_text()[-2000:]
    assert tab.errors == [], tab.errors


@pytest.mark.timeout(300)
def test_a_tab_keeps_finding_nodes_over_its_data_channels_with_the_server_killed(
        tmp_path: Path) -> None:
    """A p2p run in a private network namespace (e2e/dht_p2p_scenario.py): the tab's DHT rides
    the shard channels the run opened; with the server process killed, its lookups of both
    native nodes still succeed, over those channels alone."""
    from e2e.conftest import netns_env
    from tests.conftest import in_netns

    netns_env()
    res = in_netns("e2e.dht_p2p_scenario", [str(tmp_path)], timeout=280)
    print(json.dumps(res))  # shown with -s
    assert all(r["found"] for r in res["before"]), res
    assert all(r["found"] for r in res["after"]), res  # the server is gone
    delta = res["delta"]
    assert delta["found"] == res["natives"], res
    assert delta["direct_out"] >= res["natives"], res  # queries on the channels
    assert delta["direct_in"] >= res["natives"], res  # and their answers
    assert delta["relay_out"] == 0, res  # nothing went through the (dead) relay
    assert res["dht"]["relay_up"] is False, res
    assert res["console_errors_before_kill"] == [], res
    # after the kill the page logs its failed reconnects and fetches (refused, or reset when
    # in flight); nothing else
    assert [e for e in res["console_errors"] if "net::ERR_CONNECTION_" not in e] == [], res
