"""A node's Kademlia carrier (docs/dht.md, "Carriers"): shared.dht over the node's direct data
channels where it has one, and over the server's WebSocket relay otherwise.

Addresses in the node's signed record, in order of preference:

    rtc:<node id>     a data channel of the node's PeerMesh (native_node.mesh) to that node
    relay:<node id>   a `Dht` frame on the control WebSocket; the server forwards it
                      re-signed with the sender's id (server.dht); relay:server is the
                      server's own DHT node, the bootstrap

Sending to `rtc:P` uses the open channel to P, else falls through to `relay:P` at once (the
DHT would try the next address only after its RPC timeout). On a channel, a `Dht` frame
travels unsigned: the channel's DTLS fingerprint was attested by the server when it opened,
so what arrives on P's channel is from P (native_node.mesh), and the frame must name P. From
the server, the relay frame's signature says who sent it. Either way the DHT believes the
sender only if its verified record lists the address the message came in on.

`connect_contacts` opens channels to the node's DHT contacts while signaling works: once
open, they carry lookups with the server gone (tests/test_dht_live.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from shared.dht import DhtConfig, DhtNode, LookupResult
from shared.dht.aio import DhtHost
from shared.envelope import Identity
from shared.errors import ProtocolError
from shared.messages import SERVER, Dht, Message, decode_message

log = logging.getLogger("native_node.dht")
RTC, RELAY = "rtc:", "relay:"
SERVER_ADDR = RELAY + SERVER

SendFrame = Callable[[bytes], Awaitable[None]]  # a frame on the control WebSocket
SignFrame = Callable[[Message], bytes]  # the participant's `frame`: signed for the connection


class NodeDht(DhtHost):
    def __init__(self, identity: Identity, run_id: str, *, send_frame: SendFrame,
                 sign: SignFrame, mesh: Any = None, bootstrap: tuple[str, ...] = (SERVER_ADDR,),
                 config: DhtConfig | None = None) -> None:
        super().__init__()
        self.identity, self.me, self.run_id = identity, identity.node_id, run_id
        self.send_frame, self.sign, self.mesh = send_frame, sign, mesh
        self.bootstrap, self.config = bootstrap, config
        self.counters: Counter[str] = Counter()
        self.relay_up = True  # the control WebSocket is connected (the driver says)

    @property
    def addrs(self) -> tuple[str, ...]:
        relay = RELAY + self.me
        return (RTC + self.me, relay) if self.mesh is not None else (relay,)

    @property
    def node(self) -> DhtNode:
        assert self.service is not None, "start() first"
        return self.service.node

    def start(self) -> None:
        """Start the DHT node on the running loop; it pings the bootstrap addresses."""
        self._launch(DhtNode(self.identity, self.addrs, now=time.time(), config=self.config,
                             bootstrap=self.bootstrap, seed=int(self.me[:8], 16)))

    async def find(self, node_id: str) -> LookupResult:
        """A node lookup: LookupResult.found when `node_id` itself answered."""
        assert self.service is not None, "start() first"
        return await self.service.find(node_id)

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
        if len(frame) < 6 or frame[5] != Dht.TYPE:
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
            self._spawn(self._relay(addr[len(RELAY):], data))
        else:
            self.counters["unknown_addr"] += 1

    def _channel_open(self, peer: str) -> bool:
        mesh = self.mesh
        if mesh is None or peer not in mesh.links:
            return False
        ev = mesh.opened.get(peer)
        return ev is not None and ev.is_set()

    async def _direct(self, peer: str, frame: bytes, data: bytes) -> None:
        try:
            ok = await self.mesh.send(peer, frame)
        except (ConnectionError, RuntimeError, OSError):
            ok = False
        if ok:
            self.counters["direct_out"] += 1
        else:
            await self._relay(peer, data)

    async def _relay(self, to: str, data: bytes) -> None:
        if not self.relay_up:
            self.counters["relay_down"] += 1
            return
        try:
            await self.send_frame(self.sign(Dht(run_id=self.run_id, node_id=self.me, to=to,
                                                payload=data)))
            self.counters["relay_out"] += 1
        except (ConnectionError, RuntimeError, ProtocolError, OSError) as exc:
            self.counters["relay_failed"] += 1
            log.debug("dht relay to %s failed: %s", to[:12], exc)

    # -- channels ----------------------------------------------------------------------------
    def contacts(self) -> list[str]:
        """Node ids in the routing table (not the server's node)."""
        return [c.record.node_id for c in self.node.table.contacts()
                if RELAY + SERVER not in c.record.addrs]

    async def connect_contacts(self, limit: int = 8) -> int:
        """Open data channels to up to `limit` DHT contacts (needs the server's signaling);
        how many are open."""
        if self.mesh is None:
            return 0
        peers = self.contacts()[:limit]
        opened = await asyncio.gather(*(self.mesh.connect(p) for p in peers),
                                      return_exceptions=True)
        with contextlib.suppress(Exception):
            self.counters["channels"] = sum(1 for ok in opened if ok is True)
        return self.counters["channels"]
