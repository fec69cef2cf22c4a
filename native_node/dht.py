"""A node's Kademlia carrier (docs/dht.md, "Carriers"): shared.dht.carrier.DhtCarrier (the
addresses, routing, checks and relay signing that tabs share, browser/node/dht_glue.py) over the
node's PeerMesh data channels (native_node.mesh) and its control WebSocket.

`connect_contacts` opens channels to the node's DHT contacts while signaling works: once
open, they carry lookups with the server gone (tests/test_dht_live.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from shared.dht import DhtConfig
from shared.dht.carrier import RELAY, RTC, SERVER_ADDR, DhtCarrier, SignFrame
from shared.envelope import Identity

__all__ = ["RELAY", "RTC", "SERVER_ADDR", "NodeDht"]
SendFrame = Callable[[bytes], Awaitable[None]]  # a frame on the control WebSocket


class NodeDht(DhtCarrier):
    def __init__(self, identity: Identity, run_id: str, *, send_frame: SendFrame,
                 sign: SignFrame, mesh: Any = None, bootstrap: tuple[str, ...] = (SERVER_ADDR,),
                 config: DhtConfig | None = None) -> None:
        super().__init__(identity, run_id, sign=sign, channels=mesh is not None,
                         bootstrap=bootstrap, config=config)
        self.send_frame, self.mesh = send_frame, mesh

    def _channel_open(self, peer: str) -> bool:
        mesh = self.mesh
        if mesh is None or peer not in mesh.links:
            return False
        ev = mesh.opened.get(peer)
        return ev is not None and ev.is_set()

    async def _send_direct(self, peer: str, frame: bytes) -> bool:
        return bool(await self.mesh.send(peer, frame))

    async def _send_relay(self, frame: bytes) -> None:
        await self.send_frame(frame)

    # -- channels ----------------------------------------------------------------------------
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
