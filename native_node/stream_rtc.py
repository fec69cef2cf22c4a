"""Streamed updates over the node's data channel to the server (`transport = "star"` with
`stream_chunk_mb` > 0; docs/protocol.md, "Streamed updates").

The update is our signed Submit frame (one-shot encoding), or a `Spooled` one (encoded by
chunks into a spool file, shared.chunk_submit): it is announced with
`Sender.start_spooled` and its chunks are read from the spool as they go out, on whichever
path, as on the WebSocket.

The frames are the WebSocket's (native_node.stream_upload drives shared.stream_up): a signed
`StreamSubmit`, the server's `Resume` (it always comes on the WebSocket), then unsigned
`Chunk`s, each a frame of its own on the channel's FrameLink, so the server checks each one
on arrival against the manifest (server.streams, the same transfer and spool as on the
socket). This module only picks the path of each frame:

- the `StreamSubmit` goes over the channel when it is open (the first update waits, at most
  `rtc_timeout_s`, for it to open, as a single-frame update does), else over the WebSocket;
- the chunks after a `Resume` go over the channel when it is open at that moment, and all of
  that `Resume`'s chunks stay on the path chosen (the server's window tolerates reordering
  within 16 chunks, not a switch of paths);
- a channel lost mid-transfer (closed, or stalled past FrameLink's stall timeout) stops the
  chunks; the node announces the same update again on the WebSocket (a fresh nonce, the same
  manifest), the server answers `Resume` at the first chunk it has not verified, and only the
  rest travels. The node offers a new channel at once (at most MAX_REOFFERS times a session);
  the transfers after that go over it once it is open.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from shared.chunk_encode import Spooled

if TYPE_CHECKING:
    from native_node.client import NodeClient
    from transport.rtc import StarUplink

log = logging.getLogger("native_node.stream_rtc")
MAX_REOFFERS = 3  # new channels offered after losing one, per connection to the server


class ChannelLost(ConnectionError):
    """The data channel failed while a transfer's chunks went over it."""


class ChannelSocket:
    """What the uploader sends on (`send_bytes`, `closed`): the data channel when `uplink`
    is given, else the WebSocket. `wait`: the first frame waits for the channel to open or
    be given up (an announcement); without it a failed send raises ChannelLost (chunks)."""

    def __init__(self, route: StreamRoute, ws: Any, uplink: StarUplink | None, *,
                 wait: bool) -> None:
        self.route, self.ws, self.uplink, self.wait = route, ws, uplink, wait

    @property
    def closed(self) -> bool:
        return bool(self.ws.closed)

    async def send_bytes(self, frame: bytes) -> None:
        up = self.uplink
        if up is not None:
            if not self.wait and not up.ready():
                raise self.route.lost(up)
            if await up.send(frame):
                self.route.counts["frames_rtc"] += 1
                return
            if not self.wait:
                raise self.route.lost(up)
            self.route.maybe_reoffer(up)  # the announcement falls back to the WebSocket
        await self.ws.send_bytes(frame)
        self.route.counts["frames_ws"] += 1


class StreamRoute:
    """The node's choice of path for streamed-update frames in a star run."""

    def __init__(self, client: NodeClient) -> None:
        self.client = client
        self.update: bytes | Spooled | None = None  # the update streaming now (its signed
        # Submit frame, or encoded by chunks into a spool)
        self.counts: Counter[str] = Counter()  # frames_rtc, frames_ws, lost, reoffers, spooled
        self.reoffers = 0
        self._welcome: Any = None  # the Welcome the reoffers were counted under
        self._replaced: StarUplink | None = None  # the uplink a reoffer is replacing
        self._tasks: set[asyncio.Future[Any]] = set()

    def takes(self, frame: bytes) -> bool:
        """Whether an update frame goes streamed and this run has a star uplink."""
        return self.client.uplink is not None and self.client.uploader.wants(frame)

    def takes_spooled(self) -> bool:
        """Whether a spooled update goes over this run's star uplink (always streamed)."""
        return self.client.uplink is not None

    async def start(self, update: bytes | Spooled) -> None:
        """Announce `update` (our signed Submit frame, or a spooled update), over the channel
        if it opens."""
        ws = self.client.ws
        if ws is None or ws.closed:
            return  # resubmitted after the reconnect
        self.update = update
        if isinstance(update, Spooled):
            self.counts["spooled"] += 1
        up = self.client.uplink
        if up is not None and not up.decided.is_set():
            # a resubmission right after a reconnect: the channel's answer comes on this
            # socket, so the session must go on reading it while the announcement waits
            self._background(self._announce(ws, up, update))
            return
        await self._announce(ws, up, update)

    async def _announce(self, ws: Any, up: StarUplink | None, update: bytes | Spooled) -> None:
        try:
            await self._send_announcement(ChannelSocket(self, ws, up, wait=True), update)
        except (ConnectionError, RuntimeError) as exc:  # aiohttp's errors derive from these
            log.warning("send failed (%s); the update is resubmitted after the reconnect", exc)

    async def _send_announcement(self, sock: Any, update: bytes | Spooled) -> None:
        """The update's signed StreamSubmit on `sock`; the Sender's update in flight is then
        this one (its chunks cut from the Submit's payload, or read from the spool)."""
        if isinstance(update, Spooled):
            await sock.send_bytes(self.client.uploader.sender.start_spooled(update)["frame"])
        else:
            await self.client.uploader.start(sock, update)

    def deferred(self, frame: bytes) -> bool:
        """A one-frame update while the star channel is being set up (a resubmission right
        after a reconnect): sent from a task once the channel opened or was given up, so the
        session goes on reading the socket where the channel's answer comes. True if so."""
        up = self.client.uplink
        if up is None or up.decided.is_set():
            return False
        self._background(self._send_when_decided(up, frame))
        return True

    async def _send_when_decided(self, up: StarUplink, frame: bytes) -> None:
        if await up.send(frame):  # waits (at most rtc_timeout_s) for the channel
            return
        ws = self.client.ws
        if ws is None or ws.closed:
            return  # resubmitted after the reconnect
        try:
            await ws.send_bytes(frame)
        except (ConnectionError, RuntimeError) as exc:
            log.warning("send failed (%s); the update is resubmitted after the reconnect", exc)

    def socket(self, ws: Any) -> Any:
        """Where a Resume's chunks go: the channel if it is open now, else `ws` itself."""
        up = self.client.uplink
        if up is None:
            return ws
        if up.ready():
            return ChannelSocket(self, ws, up, wait=False)
        self.maybe_reoffer(up)
        return ws

    def lost(self, up: StarUplink) -> ChannelLost:
        """The channel failed mid-transfer: announce again on the WebSocket (the server
        resumes from its first missing chunk) and offer a new channel."""
        self.counts["lost"] += 1
        log.warning("data channel to the server lost mid-transfer: the streamed update "
                    "resumes over the WebSocket from the first chunk the server lacks")
        up.fell_back = True
        self.maybe_reoffer(up)
        self._background(self._announce_on_socket())
        return ChannelLost("data channel to the server lost")

    async def _announce_on_socket(self) -> None:
        ws, update = self.client.ws, self.update
        if ws is None or ws.closed or update is None:
            return  # the reconnect resubmits it
        await asyncio.sleep(0)  # let the interrupted sender finish first
        try:
            await self._send_announcement(ws, update)
        except (ConnectionError, RuntimeError) as exc:
            log.warning("cannot announce the update again (%s); it resumes after the "
                        "reconnect", exc)

    def maybe_reoffer(self, up: StarUplink) -> None:
        """Offer a new channel when `up`'s channel had opened and is gone now."""
        if up is not self.client.uplink or up is self._replaced or not up.opened.is_set() \
                or up.channel.readyState == "open":
            return
        welcome = self.client.part.welcome
        if welcome is None or welcome.transport != "star":
            return
        if welcome is not self._welcome:  # a new connection: new offers allowed
            self._welcome, self.reoffers = welcome, 0
        if self.reoffers >= MAX_REOFFERS:
            return
        self._replaced = up
        self.reoffers += 1
        self.counts["reoffers"] += 1
        log.info("offering a new data channel to the server (%d of at most %d)",
                 self.reoffers, MAX_REOFFERS)
        self._background(self.client._start_uplink(
            {"transport": "star", "rtc_timeout_s": welcome.rtc_timeout_s}))

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
