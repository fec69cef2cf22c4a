"""The server's WebRTC side: signaling relay between nodes, and the `star` aggregator peer.

Signaling: a node's signed `Signal` (authenticated like every frame: it can only signal as
itself) is forwarded to its target node, re-signed by the server with `node_id` = the sender.
A Signal addressed to "server" is for the server's own aiortc peer: with `transport = "star"`
each trainer offers a data channel to it and sends its update frames there instead of on the
WebSocket. Frames arriving on a node's channel go through the same `handle_frame` as the
WebSocket's (signature, replay and round checks included), bound to that node's connection;
streamed-update frames among them (StreamSubmit, Chunk: native_node.stream_rtc, and
browser/node/stream_pump.js for tabs) are counted
(`stream_submits_rtc`, `stream_chunks_rtc`; /api/run `stream`).
A node whose channel does not open within `rtc_timeout_s` keeps using its WebSocket (relay);
`/api/peers` shows which (`transport`: webrtc / relay / ws).

The hub does not hold the coordinator: it reaches nodes through `RtcHost` (look a node up,
send it a frame, hand a channel's frames to the frame handler) and reads its settings from
`RtcSettings`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription

from server.config import RunConfig
from server.peers import Connection, Peer
from server.turn import IceServers
from shared.errors import BadUpdate, UnknownNode
from shared.messages import HEX64, SERVER, Chunk, Message, Signal, StreamSubmit
from transport.rtc import FrameLink, pair_type, rtc_config

log = logging.getLogger("server.rtc")
PAIR_TYPES = ("host", "srflx", "relay")  # what a node may report in a "path" Signal
MAX_PATHS = 1024  # peers whose pair type is kept per node
# streamed-update frames counted when they come over a node's data channel
STREAM_FRAMES = {Chunk.TYPE: "stream_chunks_rtc", StreamSubmit.TYPE: "stream_submits_rtc"}


class RtcHost(Protocol):
    """What the hub needs from the coordinator."""

    counters: Counter[str]  # the run's counters (stream frames that came over a channel)

    def conn(self, node_id: str) -> Connection | None: ...  # None when not connected

    async def send(self, conn: Connection, msg: Message | bytes) -> None: ...  # signed

    async def handle_frame(self, conn: Connection, data: bytes) -> None: ...  # as on its socket


@dataclass(frozen=True, kw_only=True, slots=True)
class RtcSettings:
    transport: str  # the run's topology: the server's own peer answers offers with "star"
    ice_servers: tuple[str, ...]  # STUN/TURN URLs for the server's peer connections
    max_frame: int  # largest frame a data channel may carry, bytes

    @classmethod
    def of(cls, config: RunConfig) -> RtcSettings:
        return cls(transport=config.transport, max_frame=config.max_frame,
                   ice_servers=tuple(s for s in config.ice_servers.split(",") if s))


class RtcHub:
    def __init__(self, host: RtcHost, settings: RtcSettings) -> None:
        self.host, self.settings = host, settings
        self.pcs: dict[str, RTCPeerConnection] = {}
        self.links: dict[str, FrameLink] = {}
        # the run's STUN/TURN servers; python -m server sets the TURN secret (server.turn)
        self.ice = IceServers(urls=settings.ice_servers)

    def ice_for(self, node_id: str) -> list[dict[str, Any]]:
        """Welcome.ice_servers for a node: TURN credentials minted for it now."""
        return self.ice.for_node(node_id)

    async def on_signal(self, conn: Connection, msg: Signal) -> None:
        peer = conn.peer
        assert peer is not None
        if msg.kind == "path":
            self._on_path(peer, msg)
            return
        if msg.to != SERVER:  # node -> node: forward, attested by the server's signature
            target = self.host.conn(msg.to)
            if target is None:
                raise UnknownNode(f"signal target {msg.to[:12]} is not connected", field="to")
            fwd = Signal(run_id=msg.run_id, node_id=peer.node_id, to=msg.to, kind=msg.kind,
                         data=msg.data)
            await self.host.send(target, fwd)
            return
        if msg.kind == "bye":
            await self.close(peer.node_id)
            return
        if msg.kind == "candidate":
            return  # aiortc answers with every candidate in its SDP; trickled ones are ignored
        if msg.kind != "offer" or self.settings.transport != "star":
            raise BadUpdate(f"the server's peer takes offers only with transport 'star' "
                            f"(got {msg.kind!r}, run transport "
                            f"{self.settings.transport!r})", field="kind")
        await self.close(peer.node_id)  # a fresh offer replaces an older connection
        peer.transport = "relay"  # until its channel opens, its updates come on the socket
        pc = RTCPeerConnection(rtc_config(self.ice.for_node(SERVER)))
        self.pcs[peer.node_id] = pc
        pc.on("datachannel", lambda ch: self._attach(conn, ch))
        await pc.setRemoteDescription(RTCSessionDescription(sdp=msg.data, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        await self.host.send(conn, Signal(run_id=msg.run_id, node_id=SERVER, to=peer.node_id,
                                           kind="answer", data=pc.localDescription.sdp))

    def _attach(self, conn: Connection, channel: RTCDataChannel) -> None:
        peer = conn.peer
        assert peer is not None
        host = self.host

        async def on_frame(frame: bytes) -> None:
            kind = STREAM_FRAMES.get(frame[5]) if len(frame) > 5 else None
            if kind is not None:  # streamed updates: which path their frames took
                host.counters[kind] += 1
            await host.handle_frame(conn, frame)

        link = FrameLink(channel, on_frame, max_frame=self.settings.max_frame)
        self.links[peer.node_id] = link
        peer.transport = "webrtc"
        pc = self.pcs.get(peer.node_id)
        pair = pair_type(pc) if pc is not None else None
        if pair is not None:
            peer.ice_pairs[SERVER] = pair
        log.info("node %s: data channel open (star, %s candidate pair)", peer.node_id[:12],
                 pair)

        def closed() -> None:
            if self.links.get(peer.node_id) is link:
                del self.links[peer.node_id]
                if peer.transport == "webrtc":
                    peer.transport = "relay"

        channel.on("close", closed)

    @staticmethod
    def _on_path(peer: Peer, msg: Signal) -> None:
        """A node says which candidate pair its connection to a peer (or to the server's
        peer) selected: shown by /api/peers as `ice_pairs`."""
        if msg.to != SERVER:
            raise BadUpdate("a path signal goes to the server", field="to")
        try:
            info = json.loads(msg.data)
            other, pair = str(info["peer"]), str(info["pair"])
        except (ValueError, TypeError, KeyError):
            raise BadUpdate('a path signal\'s data is {"peer": ID, "pair": TYPE}',
                            field="data") from None
        if pair not in PAIR_TYPES or not (other == SERVER or HEX64.fullmatch(other)):
            raise BadUpdate(f"path: pair must be one of {list(PAIR_TYPES)} and peer a node id "
                            f"or 'server'", field="data")
        if other not in peer.ice_pairs and len(peer.ice_pairs) >= MAX_PATHS:
            return  # bounded per peer
        peer.ice_pairs[other] = pair

    async def close(self, node_id: str) -> None:
        self.links.pop(node_id, None)
        pc = self.pcs.pop(node_id, None)
        if pc is not None:
            with contextlib.suppress(Exception):
                await pc.close()

    async def close_all(self) -> None:
        await asyncio.gather(*(self.close(n) for n in list(self.pcs)))
