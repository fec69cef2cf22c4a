"""Protocol frames over a WebRTC data channel (aiortc): chunked, back-pressured, checked.

`FrameLink` wraps one reliable, ordered RTCDataChannel. `send_frame` cuts a frame into
shared.rtc chunks (each under the 256 KiB message limit) and waits whenever the channel's
`bufferedAmount` is above HIGH_WATER until the "bufferedamountlow" event (threshold
LOW_WATER): memory stays bounded however large the update. A transfer can be cancelled
mid-way (the round closed): the receiver is told and drops what it buffered. Received chunks
go through a shared.rtc.Reassembler, which checks every header and the frame's SHA-256;
whole frames are handed to `on_frame`. A bad chunk is counted and logged, never raised into
aiortc's event loop.

`connect_pair` wires two in-process RTCPeerConnections (offer/answer with the candidates
inside the SDP, as aiortc gathers them before it answers); the server and nodes use the same
offer/answer exchange through the control WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)

from shared.errors import ProtocolError
from shared.rtc import CHUNK_DATA, Reassembler, cancel_chunk, chunks

log = logging.getLogger("transport.rtc")
HIGH_WATER = 4 * 1024 * 1024  # pause sending above this many buffered bytes
LOW_WATER = 1 * 1024 * 1024  # resume below this (bufferedAmountLowThreshold)

FrameHandler = Callable[[bytes], Awaitable[None] | None]
# an ICE server: a URL, or Welcome.ice_servers' {"urls", "username", "credential"}
IceServer = str | Mapping[str, Any]
PAIR_RANK = {"host": 0, "srflx": 1, "prflx": 1, "relay": 2}  # how indirect a candidate is


def rtc_config(ice_servers: Sequence[IceServer] | None = None) -> RTCConfiguration:
    """No STUN/TURN unless configured: the default public STUN server is unreachable offline.
    aiortc uses the first STUN and the first TURN server of the list (aioice takes one of
    each)."""
    servers: list[RTCIceServer] = []
    stun = turn = False
    for s in ice_servers or []:
        if isinstance(s, str):
            url, user, cred = s, None, None
        else:
            url, user, cred = str(s["urls"]), s.get("username") or None, \
                s.get("credential") or None
        is_turn = url.startswith("turn")
        if (turn if is_turn else stun):
            continue  # aiortc refuses a second one of a kind
        stun, turn = stun or not is_turn, turn or is_turn
        servers.append(RTCIceServer(urls=url, username=user, credential=cred))
    return RTCConfiguration(iceServers=servers)


def pair_type(pc: RTCPeerConnection) -> str | None:
    """The type of the candidate pair `pc`'s data channel selected: "relay" when either end
    is a TURN relay candidate, "srflx" when either is server- or peer-reflexive (a NAT's
    mapping), else "host"; None before one is selected. Reads aioice's nominated pair (aiortc
    has no getStats for it)."""
    try:
        ice = pc.sctp.transport.transport  # type: ignore[union-attr]
        pair = ice._connection._nominated.get(1)
    except AttributeError:
        return None
    if pair is None:
        return None
    kinds = (pair.local_candidate.type, pair.remote_candidate.type)
    worst = max(kinds, key=lambda k: PAIR_RANK.get(k, 1))
    return "srflx" if worst == "prflx" else worst


def has_relay_candidate(sdp: str) -> bool:
    """Whether an SDP lists a TURN relay candidate of ours."""
    return " typ relay" in sdp


class FrameLink:
    def __init__(self, channel: RTCDataChannel, on_frame: FrameHandler | None = None, *,
                 max_frame: int = 64 * 1024 * 1024, chunk_data: int = CHUNK_DATA) -> None:
        self.channel = channel
        self.chunk_data = chunk_data
        self.on_frame = on_frame
        self.reasm = Reassembler(max_frame=max_frame)
        self.next_id = 0
        self.bytes_sent = self.bytes_received = 0
        self.frames_sent = self.frames_received = 0
        self.errors: Counter[str] = Counter()
        self._low = asyncio.Event()
        self._tasks: set[asyncio.Future[None]] = set()
        channel.bufferedAmountLowThreshold = LOW_WATER
        channel.on("bufferedamountlow", self._low.set)
        channel.on("message", self._on_message)

    async def send_frame(self, frame: bytes, *, cancel: asyncio.Event | None = None,
                         stall_timeout: float = 30.0) -> bool:
        """Send one frame; False when `cancel` was set before it all went out."""
        tid = self.next_id
        self.next_id = (self.next_id + 1) % 2**32
        for chunk in chunks(frame, tid, chunk_data=self.chunk_data):
            while self.channel.bufferedAmount > HIGH_WATER:
                self._low.clear()
                await asyncio.wait_for(self._low.wait(), timeout=stall_timeout)
            if cancel is not None and cancel.is_set():
                self.channel.send(cancel_chunk(tid))
                return False
            if self.channel.readyState != "open":
                raise ConnectionError(f"data channel is {self.channel.readyState}")
            self.channel.send(chunk)
            self.bytes_sent += len(chunk)
        self.frames_sent += 1
        return True

    def _on_message(self, message: bytes | str) -> None:
        if not isinstance(message, bytes):
            self.errors["bad_frame"] += 1
            log.warning("text message on a frame channel: ignored")
            return
        self.bytes_received += len(message)
        try:
            frame = self.reasm.feed(message)
        except ProtocolError as exc:
            self.errors[exc.code] += 1
            log.warning("bad data-channel chunk: %s", exc)
            return
        if frame is None:
            return
        self.frames_received += 1
        if self.on_frame is not None:
            res = self.on_frame(frame)
            if asyncio.iscoroutine(res):
                task = asyncio.ensure_future(res)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)


async def connect_pair(*, timeout: float = 15.0, label: str = "frames"
                       ) -> tuple[RTCPeerConnection, RTCPeerConnection, RTCDataChannel,
                                  RTCDataChannel]:
    """Two connected peers in this process and the two ends of one data channel."""
    a, b = RTCPeerConnection(rtc_config()), RTCPeerConnection(rtc_config())
    chan_a = a.createDataChannel(label, ordered=True)
    got: asyncio.Future[RTCDataChannel] = asyncio.get_running_loop().create_future()

    def on_channel(ch: RTCDataChannel) -> None:
        if not got.done():
            got.set_result(ch)

    b.on("datachannel", on_channel)
    opened = asyncio.Event()
    chan_a.on("open", opened.set)
    await a.setLocalDescription(await a.createOffer())
    await b.setRemoteDescription(a.localDescription)
    await b.setLocalDescription(await b.createAnswer())
    await a.setRemoteDescription(b.localDescription)
    chan_b = await asyncio.wait_for(got, timeout)
    await asyncio.wait_for(opened.wait(), timeout)
    return a, b, chan_a, chan_b


class StarUplink:
    """A node's data channel to the server's peer (`transport = "star"`): offer through the
    control socket, then update frames over the channel. Until the channel is open, or when
    it fails, `ready()` is False and the caller sends on its WebSocket (relay fallback)."""

    def __init__(self, send_signal: Callable[[str, str], Awaitable[None]], *,
                 timeout_s: float = 10.0, ice_servers: Sequence[IceServer] | None = None
                 ) -> None:
        self.send_signal = send_signal  # (kind, data) -> a signed Signal to "server"
        self.timeout_s = timeout_s
        self.pc = RTCPeerConnection(rtc_config(ice_servers))
        self.channel = self.pc.createDataChannel("updates", ordered=True)
        self.link = FrameLink(self.channel)
        self.opened = asyncio.Event()
        self.channel.on("open", self.opened.set)
        self.fell_back = False
        self.pair: str | None = None  # the selected candidate pair's type, once open
        self.decided = asyncio.Event()  # set once the channel opened or we fell back

    async def start(self) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        await self.send_signal("offer", self.pc.localDescription.sdp)

    async def on_answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def wait_open(self) -> bool:
        """True once the channel is open; False (and relay from then on) after timeout_s."""
        try:
            await asyncio.wait_for(self.opened.wait(), timeout=self.timeout_s)
        except TimeoutError:
            self.fell_back = True
            log.warning("data channel to the server not open after %.0f s: relaying updates "
                        "over the WebSocket", self.timeout_s)
            return False
        finally:
            self.decided.set()
        self.pair = pair_type(self.pc)
        log.info("data channel to the server open (%s candidate pair): updates go "
                 "peer-to-server over WebRTC", self.pair)
        if self.pair is not None:
            await self.send_signal("path", json.dumps({"peer": "server", "pair": self.pair}))
        return True

    def ready(self) -> bool:
        return not self.fell_back and self.channel.readyState == "open"

    async def send(self, frame: bytes) -> bool:
        """Send over the channel; False if it is not usable (the caller relays). The first
        update waits (at most rtc_timeout_s) until the channel opened or was given up."""
        if not self.decided.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.decided.wait(), timeout=self.timeout_s + 1.0)
        if not self.ready():
            return False
        try:
            return await self.link.send_frame(frame)
        except (ConnectionError, TimeoutError) as exc:
            log.warning("data channel send failed (%s): relaying over the WebSocket", exc)
            self.fell_back = True
            return False

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.pc.close()


async def probe_turn(server: Mapping[str, Any], *, timeout_s: float = 5.0) -> str | None:
    """Allocate (and release) one relay on a TURN server with its credential: None when the
    server grants it, else why not, in words (aioice drops a refused allocation silently:
    without this check a bad credential shows only as ICE failing later)."""
    import time

    from aioice import stun, turn
    from aiortc.rtcicetransport import parse_stun_turn_uri

    url, user = str(server["urls"]), str(server.get("username") or "")
    try:
        parsed = parse_stun_turn_uri(url)
    except ValueError as exc:
        return f"{url}: {exc}"
    head = user.split(":", 1)[0]
    expired = head.isdigit() and int(head) < time.time()
    try:
        transport, _ = await asyncio.wait_for(turn.create_turn_endpoint(
            asyncio.DatagramProtocol, server_addr=(parsed["host"], parsed["port"]),
            username=user, password=str(server.get("credential") or ""),
            ssl=parsed["scheme"] == "turns", transport=parsed["transport"]), timeout_s)
    except stun.TransactionFailed as exc:
        code = exc.response.attributes.get("ERROR-CODE", (0, ""))[0]
        why = ("the credential expired" if expired else
               "the credential is not one minted with the TURN server's secret, or expired "
               "by its clock") if code == 401 else "the allocation was refused"
        return f"TURN server {url} refused this node's credential: {exc} ({why})"
    except (OSError, TimeoutError, stun.TransactionError) as exc:
        return f"TURN server {url} did not answer ({exc.__class__.__name__}: {exc})"
    transport.close()
    return None
