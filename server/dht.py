"""The server's Kademlia node and the DHT relay (docs/dht.md, "Carriers"), run config `dht`.

The server runs the same sans-I/O `shared.dht.DhtNode` as every node, under its own identity,
reachable at the address `relay:server`: it is one bootstrap node among others, and nodes that
know each other keep finding each other without it (over their direct data channels, see
native_node/dht.py). It also relays: a node's `Dht` frame with `to` = another node is
forwarded to that node, re-signed by the server with `node_id` = the authenticated sender
(as a Signal is), so a node reached only through the server is still a DHT contact at the
address `relay:<its id>`.

Who sent a message (what the DHT calls the source address) is the connection's Hello: a
frame that reaches `on_message` passed server.auth, so `relay:<peer id>` is authenticated.
The DHT itself checks that the sender's signed record lists that address.

Cost: every relayed or answered message is one server signature (~9 ms here), so the DHT is
off by default; bench.dht measured ~0.6 DHT messages per node per second of maintenance.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from server.peers import Connection, Nodes
from shared.dht import DhtNode
from shared.dht.aio import DhtHost
from shared.dht.carrier import RELAY, SERVER_ADDR  # relay:<node id>; relay:server is ours
from shared.envelope import Identity
from shared.errors import UnknownNode
from shared.messages import SERVER, Dht

log = logging.getLogger("server.dht")


class ServerDht(DhtHost):
    """The server's DHT node, fed by the coordinator's Dht frames (server.coordinator)."""

    def __init__(self, nodes: Nodes, identity: Identity, run_id: str,
                 counters: Counter[str] | None = None) -> None:
        super().__init__()
        self.nodes, self.identity, self.run_id = nodes, identity, run_id
        self.counters: Counter[str] = counters if counters is not None else Counter()

    def start(self) -> None:
        """Start the node (on the running loop): no bootstrap, it is one."""
        self._launch(DhtNode(self.identity, [SERVER_ADDR], now=time.time(),
                             seed=int(self.identity.node_id[:8], 16)))

    @property
    def node(self) -> DhtNode | None:
        return self.service.node if self.service is not None else None

    async def on_message(self, conn: Connection, msg: Dht) -> None:
        """A node's authenticated Dht frame: for our node, or relayed to `msg.to`."""
        assert conn.peer is not None  # server.auth made sure
        sender = conn.peer.node_id
        if msg.to == SERVER:
            self.counters["dht_in"] += 1
            if self.service is not None:
                self.service.deliver(RELAY + sender, msg.payload)
            return
        target = self.nodes.conn(msg.to)
        if target is None:
            self.counters["dht_unreachable"] += 1
            raise UnknownNode(f"dht target {msg.to[:12]} is not connected", field="to")
        self.counters["dht_relayed"] += 1
        await self.nodes.send(target, Dht(run_id=self.run_id, node_id=sender, to=msg.to,
                                          payload=msg.payload))

    def _send(self, addr: str, data: bytes) -> None:
        """Our node's way out: `relay:<node id>` -> that node's connection, if it has one."""
        to = addr.removeprefix(RELAY) if addr.startswith(RELAY) else ""
        conn = self.nodes.conn(to) if to and to != SERVER else None
        if conn is None:
            self.counters["dht_unreachable"] += 1
            return
        self.counters["dht_out"] += 1
        self._spawn(self.nodes.send(
            conn, Dht(run_id=self.run_id, node_id=SERVER, to=to, payload=data)))

    def view(self) -> dict[str, Any]:
        node = self.node
        return {"node_id": self.identity.node_id, "contacts": len(node.table) if node else 0,
                "records": len(node.records) if node else 0,
                **{k.removeprefix("dht_"): n for k, n in self.counters.items()
                   if k.startswith("dht_")}}
