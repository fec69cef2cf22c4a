"""The server's WebRTC side: signaling relay between nodes, and the `star` aggregator peer.

Signaling: a node's signed `Signal` (authenticated like every frame: it can only signal as
itself) is forwarded to its target node, re-signed by the server with `node_id` = the sender.
A Signal addressed to "server" is for the server's own aiortc peer: with `transport = "star"`
each trainer offers a data channel to it and sends its update frames there instead of on the
WebSocket. Frames arriving on a node's channel go through the same `handle_frame` as the
WebSocket's (signature, replay and round checks included), bound to that node's connection.
A node whose channel does not open within `rtc_timeout_s` keeps using its WebSocket (relay);
`/api/peers` shows which (`transport`: webrtc / relay / ws).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription

from server.peers import Connection
from shared.errors import BadUpdate, UnknownNode
from shared.messages import SERVER, Signal
from transport.rtc import FrameLink, rtc_config

if TYPE_CHECKING:
    from server.coordinator import Coordinator

log = logging.getLogger("server.rtc")


class RtcHub:
    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.pcs: dict[str, RTCPeerConnection] = {}
        self.links: dict[str, FrameLink] = {}
        servers = [s for s in coord.config.ice_servers.split(",") if s]
        self.ice = servers

    async def on_signal(self, conn: Connection, msg: Signal) -> None:
        peer = conn.peer
        assert peer is not None
        if msg.to != SERVER:  # node -> node: forward, attested by the server's signature
            target = self.coord.peers.get(msg.to)
            if target is None or target.ws is None:
                raise UnknownNode(f"signal target {msg.to[:12]} is not connected", field="to")
            fwd = Signal(run_id=msg.run_id, node_id=peer.node_id, to=msg.to, kind=msg.kind,
                         data=msg.data)
            await self.coord.send(Connection(ws=target.ws, remote="", peer=target), fwd)
            return
        if msg.kind == "bye":
            await self.close(peer.node_id)
            return
        if msg.kind == "candidate":
            return  # aiortc answers with every candidate in its SDP; trickled ones are ignored
        if msg.kind != "offer" or self.coord.config.transport != "star":
            raise BadUpdate(f"the server's peer takes offers only with transport 'star' "
                            f"(got {msg.kind!r}, run transport "
                            f"{self.coord.config.transport!r})", field="kind")
        await self.close(peer.node_id)  # a fresh offer replaces an older connection
        peer.transport = "relay"  # until its channel opens, its updates come on the socket
        pc = RTCPeerConnection(rtc_config(self.ice))
        self.pcs[peer.node_id] = pc
        pc.on("datachannel", lambda ch: self._attach(conn, ch))
        await pc.setRemoteDescription(RTCSessionDescription(sdp=msg.data, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        await self.coord.send(conn, Signal(run_id=msg.run_id, node_id=SERVER, to=peer.node_id,
                                           kind="answer", data=pc.localDescription.sdp))

    def _attach(self, conn: Connection, channel: RTCDataChannel) -> None:
        peer = conn.peer
        assert peer is not None
        coord = self.coord

        async def on_frame(frame: bytes) -> None:
            await coord.handle_frame(conn, frame)

        link = FrameLink(channel, on_frame, max_frame=coord.config.max_frame)
        self.links[peer.node_id] = link
        peer.transport = "webrtc"
        log.info("node %s: data channel open (star)", peer.node_id[:12])

        def closed() -> None:
            if self.links.get(peer.node_id) is link:
                del self.links[peer.node_id]
                if peer.transport == "webrtc":
                    peer.transport = "relay"

        channel.on("close", closed)

    async def close(self, node_id: str) -> None:
        self.links.pop(node_id, None)
        pc = self.pcs.pop(node_id, None)
        if pc is not None:
            with contextlib.suppress(Exception):
                await pc.close()

    async def close_all(self) -> None:
        await asyncio.gather(*(self.close(n) for n in list(self.pcs)))
