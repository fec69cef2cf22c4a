"""A participant's Kademlia carrier (docs/dht.md, "Carriers"), shared by native nodes
(native_node/dht.py) and browser tabs (browser/node/dht_glue.py): shared.dht over the
participant's direct data channels where it has one, and over the server's WebSocket relay
otherwise. What differs between the two is only how a frame leaves (a subclass supplies
`_channel_open`, `_send_direct` and `_send_relay`); addresses, routing, the checks on what
comes in, signing for the relay and the counters are here, once.

Addresses in the participant's signed record, in order of preference:

    rtc:<node id>     a data channel to that node (native_node.mesh, browser/node/mesh.js)
    relay:<node id>   a `Dht` frame on the control WebSocket; the server forwards it
                      re-signed with the sender's id (server.dht); relay:server is the
                      server's own DHT node, the bootstrap

Sending to `rtc:P` uses the open channel to P, else falls through to `relay:P` at once (the
DHT would try the next address only after its RPC timeout). On a channel, a `Dht` frame
travels unsigned: the channel's DTLS fingerprint was attested by the server when it opened,
so what arrives on P's channel is from P, and the frame must name P. From the server, the
relay frame's signature says who sent it. Either way the DHT believes the sender only if its
verified record lists the address the message came in on.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from shared.dht.aio import DhtHost
from shared.dht.config import DhtConfig
from shared.dht.lookup import LookupResult
from shared.dht.node import DhtNode
from shared.envelope import Identity
from shared.errors import ProtocolError
from shared.messages import SERVER, Dht, Message, decode_message

RTC, RELAY = "rtc:", "relay:"
SERVER_ADDR = RELAY + SERVER
SignFrame = Callable[[Message], bytes]  # the participant's `frame`: signed for the connection


def is_dht_frame(frame: bytes) -> bool:
    """A frame on a data channel that is a `Dht` frame (its type byte), to hand to the DHT."""
    return len(frame) >= 6 and frame[5] == Dht.TYPE


class DhtCarrier(DhtHost):
    """One participant's DHT node and the routing of its messages (subclassed per platform)."""

    def __init__(self, identity: Identity, run_id: str, *, sign: SignFrame, channels: bool,
                 bootstrap: tuple[str, ...] = (SERVER_ADDR,),
                 config: DhtConfig | None = None) -> None:
        super().__init__()
        self.identity, self.me, self.run_id = identity, identity.node_id, run_id
        self.sign, self.channels = sign, channels
        self.bootstrap, self.config = bootstrap, config
        self.counters: Counter[str] = Counter()
        self.relay_up = True  # the control WebSocket is connected (the driver says)

    # -- what a platform supplies ------------------------------------------------------------
    def _channel_open(self, peer: str) -> bool:
        raise NotImplementedError

    async def _send_direct(self, peer: str, frame: bytes) -> bool:
        """`frame` on `peer`'s data channel: False when it did not go (then the relay)."""
        raise NotImplementedError

    async def _send_relay(self, frame: bytes) -> None:
        """A signed frame on the control WebSocket (raises ConnectionError when closed)."""
        raise NotImplementedError

    # -- lifetime ------------------------------------------------------------------------------
    @property
    def addrs(self) -> tuple[str, ...]:
        relay = RELAY + self.me
        return (RTC + self.me, relay) if self.channels else (relay,)

    @property
    def node(self) -> DhtNode:
        assert self.service is not None, "start() first"
        return self.service.node

    def start(self) -> None:
        """Start the DHT node on the running loop; it pings the bootstrap addresses."""
        self._launch(DhtNode(self.identity, self.addrs, now=time.time(), config=self.config,
                             bootstrap=self.bootstrap, seed=int(self.me[:8], 16)))

    def relay_restored(self) -> None:
        """The control WebSocket is back (a Welcome after a reconnect): ping the bootstrap
        now, not at the next `bootstrap_s` (300 s by default), so a restarted server's empty
        table refills at once."""
        self.relay_up = True
        if self.service is not None:
            self.service.rejoin()

    async def find(self, node_id: str) -> LookupResult:
        """A node lookup: LookupResult.found when `node_id` itself answered."""
        assert self.service is not None, "start() first"
        self.counters["lookups"] += 1
        result = await self.service.find(node_id)
        if result.found:
            self.counters["found"] += 1
        return result

    # -- in ----------------------------------------------------------------------------------
    def on_relayed(self, msg: Dht) -> None:
        """A verified Dht frame from the server (the participant's "dht" event)."""
        if self.service is None or msg.to != self.me:
            self.counters["dropped_in"] += 1
            return
        self.counters["relay_in"] += 1
        self.service.deliver(RELAY + msg.node_id, msg.payload)

    def on_direct(self, peer: str, frame: bytes) -> bool:
        """A frame from `peer`'s data channel: True when it was a Dht frame (taken)."""
        if not is_dht_frame(frame):
            return False
        try:
            msg = decode_message(frame, max_payload=1 << 18)
        except ProtocolError as exc:
            self.counters[f"refused_{exc.code}"] += 1
            return True
        if not isinstance(msg, Dht) or msg.node_id != peer or msg.to != self.me \
                or self.service is None:
            self.counters["refused_direct"] += 1
            return True
        self.counters["direct_in"] += 1
        self.service.deliver(RTC + peer, msg.payload)
        return True

    # -- out ---------------------------------------------------------------------------------
    def _send(self, addr: str, data: bytes) -> None:
        if addr.startswith(RTC):
            peer = addr[len(RTC):]
            if self._channel_open(peer):
                frame = Dht(run_id=self.run_id, node_id=self.me, to=peer, payload=data)
                self._spawn(self._direct(peer, frame.to_frame(), data))
                return
            addr = RELAY + peer  # no channel: the relay, now rather than after a timeout
        if addr.startswith(RELAY):
            self._spawn(self.relay(addr[len(RELAY):], data))
        else:
            self.counters["unknown_addr"] += 1

    async def _direct(self, peer: str, frame: bytes, data: bytes) -> None:
        try:
            ok = await self._send_direct(peer, frame)
        except (ConnectionError, RuntimeError, OSError):
            ok = False
        if ok:
            self.counters["direct_out"] += 1
        else:
            await self.relay(peer, data)

    async def relay(self, to: str, data: bytes) -> None:
        """`data` to `to` as a signed Dht frame through the server (nothing while it is down)."""
        if not self.relay_up:
            self.counters["relay_down"] += 1
            return
        try:
            await self._send_relay(self.sign(Dht(run_id=self.run_id, node_id=self.me, to=to,
                                                 payload=data)))
            self.counters["relay_out"] += 1
        except (ConnectionError, RuntimeError, ProtocolError, OSError):
            self.counters["relay_failed"] += 1

    # -- views -------------------------------------------------------------------------------
    def contacts(self) -> list[str]:
        """Node ids in the routing table (not the server's node)."""
        return [c.record.node_id for c in self.node.table.contacts()
                if SERVER_ADDR not in c.record.addrs]

    def summary(self) -> dict[str, Any]:
        """A small view for a status line: table size, lookups done and found, traffic."""
        node = self.service.node if self.service is not None else None
        c = self.counters
        return {"contacts": len(node.table) if node is not None else 0,
                "records": len(node.records) if node is not None else 0,
                "lookups": c["lookups"], "found": c["found"],
                "direct_in": c["direct_in"], "direct_out": c["direct_out"],
                "relay_in": c["relay_in"], "relay_out": c["relay_out"]}
