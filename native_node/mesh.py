"""Direct data channels between nodes, signaled through the server: the `p2p` topology's links.

`PeerMesh` keeps one RTCPeerConnection and one ordered data channel ("p2p") per other node.
The node with the smaller id offers; the other answers. Offers and answers travel as signed
`Signal`s through the control WebSocket: the server forwards a node's Signal to its target
re-signed with the authenticated sender's id (server/rtc.py), so a node can only signal as
itself. aiortc gathers its candidates before it answers, so each SDP carries them (trickled
candidates are ignored). Frames go through transport.rtc.FrameLink: chunked under the
256 KiB message limit, back-pressured, digest-checked.

Who is on the other end: the channel's DTLS fingerprint is in the SDP the server attested as
coming from that node, so what arrives on a peer's channel is from that peer; `on_frame`
gets its id with every frame. The offering side negotiates one fresh connection when the
channel is not open at half of `timeout_s` or ICE failed (aiortc has no ICE restart); a peer
whose channel is still not open after `timeout_s` is marked failed and `send` returns False:
the caller relays through the server instead. The candidate pair an open channel selected
goes to the server (Signal "path", /api/peers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence

from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription

from shared.messages import SERVER
from transport.rtc import FrameLink, IceServer, pair_type, rtc_config

log = logging.getLogger("native_node.mesh")

SendSignal = Callable[[str, str, str], Awaitable[None]]  # (to, kind, data)
OnFrame = Callable[[str, bytes], Awaitable[None] | None]  # (peer id, frame)


class PeerMesh:
    def __init__(self, me: str, send_signal: SendSignal, on_frame: OnFrame, *,
                 ice_servers: Sequence[IceServer] | None = None, timeout_s: float = 10.0,
                 max_frame: int = 64 * 1024 * 1024) -> None:
        self.me = me
        self.send_signal = send_signal
        self.on_frame = on_frame
        self.ice: Sequence[IceServer] = list(ice_servers or [])  # the Welcome's STUN/TURN
        self.pairs: dict[str, str] = {}  # peer -> the selected candidate pair's type
        self.restarts = 0  # connections negotiated again after ICE failed
        self.timeout_s = timeout_s
        self.max_frame = max_frame
        self.pcs: dict[str, RTCPeerConnection] = {}
        self.links: dict[str, FrameLink] = {}
        self.opened: dict[str, asyncio.Event] = {}
        self.failed: set[str] = set()
        self._tasks: set[asyncio.Future[None]] = set()

    def offers_to(self, peer: str) -> bool:
        """True when this node is the one that offers to `peer` (the smaller id)."""
        return self.me < peer

    def _event(self, peer: str) -> asyncio.Event:
        return self.opened.setdefault(peer, asyncio.Event())

    def _attach(self, peer: str, channel: RTCDataChannel) -> None:
        async def deliver(frame: bytes) -> None:
            res = self.on_frame(peer, frame)
            if res is not None:
                await res

        link = FrameLink(channel, on_frame=deliver, max_frame=self.max_frame)

        def opened() -> None:
            self.links[peer] = link
            self.failed.discard(peer)
            self._event(peer).set()
            pc = self.pcs.get(peer)
            pair = pair_type(pc) if pc is not None else None
            log.info("p2p channel to %s open (%s candidate pair)", peer[:12], pair)
            if pair is not None:
                self.pairs[peer] = pair
                task = asyncio.ensure_future(self.send_signal(
                    SERVER, "path", json.dumps({"peer": peer, "pair": pair})))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        def closed() -> None:
            if self.links.get(peer) is link:
                del self.links[peer]
                self._event(peer).clear()

        channel.on("close", closed)
        if channel.readyState == "open":
            opened()
        else:
            channel.on("open", opened)

    async def connect(self, peer: str) -> bool:
        """Open (or wait for) the channel to `peer`; False if it is not open in time."""
        if peer == self.me:
            raise ValueError("a node has no channel to itself")
        if peer in self.links:
            return True
        event = self._event(peer)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        restart_at = loop.time() + self.timeout_s / 2
        ice_failed = asyncio.Event()
        offering = self.offers_to(peer)
        if offering and peer not in self.pcs:
            await self._offer(peer, ice_failed)
        restarted = False
        while not event.is_set() and loop.time() < deadline:
            until = deadline if restarted or not offering else restart_at
            waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(ice_failed.wait())]
            await asyncio.wait(waits, timeout=max(0.0, until - loop.time()),
                               return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if event.is_set() or loop.time() >= deadline:
                break
            if offering and not restarted and (ice_failed.is_set()
                                               or loop.time() >= restart_at):
                # aiortc 1.16 has no ICE restart (no restartIce / iceRestart offers), and aioice
                # declares failure only after ~30 s of retransmitted checks. The same effect,
                # once, at half the deadline or on failure: a fresh connection (new candidates,
                # a new TURN allocation, and a new offer in case one was lost)
                restarted = True
                self.restarts += 1
                log.warning("p2p: no channel to %s after %.1f s (ICE %s); negotiating a fresh "
                            "connection once before relaying through the server", peer[:12],
                            self.timeout_s / 2, "failed" if ice_failed.is_set() else "checking")
                ice_failed.clear()
                await self.drop(peer)
                await self._offer(peer, ice_failed)
            elif ice_failed.is_set():
                ice_failed.clear()
                await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))
        if not event.is_set():
            self.failed.add(peer)
            log.warning("p2p channel to %s not open after %.1f s%s: relaying through the server",
                        peer[:12], self.timeout_s,
                        " and one fresh negotiation" if restarted else "")
            self.pairs[peer] = "server"
            return False
        return True

    async def _offer(self, peer: str, ice_failed: asyncio.Event) -> None:
        pc = self.pcs[peer] = RTCPeerConnection(rtc_config(self.ice))

        def state() -> None:
            if pc.iceConnectionState == "failed":
                ice_failed.set()

        pc.on("iceconnectionstatechange", state)
        self._attach(peer, pc.createDataChannel("p2p", ordered=True))
        await pc.setLocalDescription(await pc.createOffer())
        await self.send_signal(peer, "offer", pc.localDescription.sdp)

    async def on_signal(self, peer: str, kind: str, data: str) -> None:
        """A Signal the server forwarded from `peer`."""
        if kind == "offer":
            if self.offers_to(peer):
                log.warning("ignoring an offer from %s: the smaller id offers", peer[:12])
                return
            await self.drop(peer)
            pc = self.pcs[peer] = RTCPeerConnection(rtc_config(self.ice))
            pc.on("datachannel", lambda ch: self._attach(peer, ch))
            await pc.setRemoteDescription(RTCSessionDescription(sdp=data, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            await self.send_signal(peer, "answer", pc.localDescription.sdp)
        elif kind == "answer":
            mine = self.pcs.get(peer)
            if mine is None or mine.signalingState != "have-local-offer":
                log.warning("ignoring an unexpected answer from %s", peer[:12])
                return
            await mine.setRemoteDescription(RTCSessionDescription(sdp=data, type="answer"))
        elif kind == "bye":
            await self.drop(peer)
        # "candidate": aiortc's SDP already lists every candidate

    async def send(self, peer: str, frame: bytes, *, cancel: asyncio.Event | None = None) -> bool:
        """Send one frame to `peer` over its channel; False when there is no open channel (the
        caller relays) or the transfer was cancelled."""
        link = self.links.get(peer)
        if link is None:
            return False
        return await link.send_frame(frame, cancel=cancel)

    async def drop(self, peer: str) -> None:
        """Close the connection to `peer` (a waiting `connect` keeps waiting for a new one)."""
        self.links.pop(peer, None)
        self._event(peer).clear()
        pc = self.pcs.pop(peer, None)
        if pc is not None:
            with contextlib.suppress(Exception):
                await pc.close()

    async def close(self) -> None:
        await asyncio.gather(*(self.drop(p) for p in list(self.pcs)))
