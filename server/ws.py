"""The control WebSocket: one per participant, binary frames only (shared.frame).

Cheap refusals (docs/protocol.md, "Limits"): an address that opens connections faster than
CONNECT_RATE/s (burst CONNECT_BURST) gets HTTP 429 before anything is signed; a connection or
node that sends frames faster than FRAME_RATE/s (burst FRAME_BURST) is closed; a connection
that has not said Hello is closed after PRE_HELLO_REFUSALS refused frames, any connection after
MAX_REFUSALS (both in server.peers, whose close_reason the coordinator also applies to frames
that reach it by another path, a star data channel). A close is a WebSocket close (code 1008
and a reason), never a signed frame, and once decided, nothing more from that connection is
processed, counted or stored: the frames still queued on it are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from server.auth import authenticate
from server.keys import COORDINATOR
from server.peers import Connection, close_reason
from server.tls import client_address
from shared.errors import ERROR_CODES, FrameError, NotAdmitted, ProtocolError
from shared.frame import decode_frame
from shared.messages import MESSAGE_TYPES, Error, Hello, message_from_frame

log = logging.getLogger("server.ws")
HELLO_TIMEOUT_S = 30.0  # a connection that has not said who it is by then is closed
CONNECT_RATE, CONNECT_BURST = 10.0, 60  # new connections per second per remote address
FRAME_RATE, FRAME_BURST = 200.0, 1000  # frames per second per node (per connection before Hello)
MAX_TRACKED = 4096  # addresses / nodes whose buckets are kept (least recently used dropped)
CHALLENGE_POOL = 64  # signed Challenges kept for reuse (see Challenges)
# fields a refusal before Hello may name in its cached Error (any other: null)
PRE_HELLO_FIELDS = frozenset({"header", "payload", "signature", "msg_type", "nonce", "round",
                              "version", "magic", "flags", "length", "header_len",
                              "payload_len", "run_id"} | {
    f.name for cls in MESSAGE_TYPES.values() for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
routes = web.RouteTableDef()


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimit:
    """Token buckets by key (an address, a node id): `allow(key)` spends one token."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = MAX_TRACKED) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.refused = 0

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        b = self._buckets.pop(key, None) or _Bucket(tokens=float(self.burst), at=now)
        b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate)
        b.at = now
        self._buckets[key] = b
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        if b.tokens < 1:
            self.refused += 1
            return False
        b.tokens -= 1
        return True


class Challenges:
    """Signed Challenge frames, reused: a connection that closes without having sent a Hello
    frame returns its (never answered) challenge to the pool, so that connecting and sending
    junk costs the server no signature. A challenge a Hello frame was sent for, refused or
    not, is never handed out again."""

    def __init__(self) -> None:
        self.pool: list[tuple[str, bytes]] = []
        self.signed = 0

    def take(self, coord: Any) -> tuple[str, bytes]:
        if self.pool:
            return self.pool.pop()
        challenge = secrets.token_hex(32)
        self.signed += 1
        return challenge, coord.challenge_frame(challenge)

    async def take_signed(self, coord: Any) -> tuple[str, bytes]:
        """`take`, with a new Challenge signed off the event loop (server.signer)."""
        if self.pool:
            return self.pool.pop()
        challenge = secrets.token_hex(32)
        self.signed += 1
        return challenge, await coord.outbox.signed(coord.challenge_msg(challenge))

    def give_back(self, challenge: str, frame: bytes) -> None:
        if len(self.pool) < CHALLENGE_POOL:
            self.pool.append((challenge, frame))


@dataclass
class Limits:
    """The server's rate limits (one per app)."""

    connects: RateLimit
    frames: RateLimit
    closed_for_refusals: int = 0
    closed_for_rate: int = 0
    dropped_after_close: int = 0  # frames that arrived on a connection already being closed
    challenges: Challenges = field(default_factory=Challenges)
    # pre-signed Errors for refusals before Hello: (code, field, variant) -> frame
    refusals: dict[tuple[str, str | None, int], bytes] = field(default_factory=dict)

    @classmethod
    def default(cls) -> Limits:
        return cls(connects=RateLimit(CONNECT_RATE, CONNECT_BURST),
                   frames=RateLimit(FRAME_RATE, FRAME_BURST))

    def view(self) -> dict[str, int]:
        return {"connections_refused": self.connects.refused,
                "frames_over_rate": self.frames.refused,
                "closed_for_refusals": self.closed_for_refusals,
                "closed_for_rate": self.closed_for_rate,
                "dropped_after_close": self.dropped_after_close,
                "challenges_signed": self.challenges.signed,
                "refusals_signed": len(self.refusals)}


LIMITS = web.AppKey("limits", Limits)


def setup(app: web.Application) -> None:
    app[LIMITS] = Limits.default()


def _limits(app: web.Application) -> Limits:
    limits = app.get(LIMITS)
    return limits if limits is not None else Limits.default()


def _pre_hello_check(coord: Any, conn: Connection, data: bytes) -> ProtocolError | None:
    """Why a frame on a connection without a Hello is refused, or None (a Hello that
    authenticates and parses: the coordinator takes it from there). The same checks, in the
    same order, as the coordinator's, without signing or storing anything."""
    try:
        frame = decode_frame(data, max_payload=coord.max_payload)
        authenticate(frame, run_id=coord.run.run_id, challenge=conn.challenge, peer_id=None,
                     peer_key=b"")
        msg = message_from_frame(frame, max_payload=coord.max_payload)
    except ProtocolError as err:
        return err
    if isinstance(msg, Hello) and not coord.run.ledger.admits(msg.node_id):
        return NotAdmitted("this run admits staked identities only (docs/ledger.md)",
                           field="node_id")
    return None


async def _refuse_before_hello(coord: Any, limits: Limits, conn: Connection,
                               err: ProtocolError, seen: dict[tuple[str, str | None], int]
                               ) -> None:
    """A refusal before Hello: counted, logged, answered with a cached pre-signed Error (its
    code and field, a fixed message), never signed per frame, never stored."""
    code = err.code if err.code in ERROR_CODES else "protocol_error"
    fld = err.field if err.field in PRE_HELLO_FIELDS else None
    variant = seen.get((code, fld), 0)  # a frame's nonce may not repeat on one connection
    seen[(code, fld)] = variant + 1
    coord.rejected[code] += 1
    conn.errors += 1
    log.warning("rejected %s before hello from %s: %s", code, conn.remote, err.message[:200])
    key = (code, fld, variant)
    data = limits.refusals.get(key)
    if data is None:
        data = coord.frame(Error(code=code, message=f"{code} (refused before hello; see "
                                 "docs/protocol.md, Error codes)", field=fld, round=None))
        limits.refusals[key] = data
    with contextlib.suppress(ConnectionError, RuntimeError):
        await conn.ws.send_bytes(data)


async def _stopped_at_socket(limits: Limits, conn: Connection,
                             ws: web.WebSocketResponse) -> bool:
    """Whether a frame must not be processed: it queued behind a close, or the sender is over
    its frame rate (its connection is then closed)."""
    if ws.closed or close_reason(conn) is not None:
        limits.dropped_after_close += 1  # queued behind the close: not processed
        return True
    key = conn.peer.node_id if conn.peer is not None else f"conn:{id(conn)}"
    if not limits.frames.allow(key):
        limits.closed_for_rate += 1
        log.warning("closing %s: more than %.0f frames/s", conn.remote, FRAME_RATE)
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"rate limit")
        return True
    return False


async def _receive(coord: Any, limits: Limits, conn: Connection, ws: web.WebSocketResponse,
                   msg: WSMessage, seen: dict[tuple[str, str | None], int]) -> None:
    """One WebSocket message: a frame (checked at the socket before Hello), a refused text
    message, or a socket error."""
    if msg.type == WSMsgType.BINARY and conn.peer is None:
        err = _pre_hello_check(coord, conn, msg.data)
        if err is not None:
            await _refuse_before_hello(coord, limits, conn, err, seen)
        else:
            await coord.handle_frame(conn, msg.data)
    elif msg.type == WSMsgType.BINARY:
        await coord.handle_frame(conn, msg.data)
    elif msg.type == WSMsgType.TEXT:
        text = FrameError("text messages are not part of the protocol: send binary frames")
        if conn.peer is None:
            await _refuse_before_hello(coord, limits, conn, text, seen)
        else:
            await coord.reject(conn, text)
    elif msg.type == WSMsgType.ERROR:
        exc = msg.data if msg.data is not None else ws.exception()
        too_big = WSCloseCode.MESSAGE_TOO_BIG
        if getattr(exc, "code", None) == too_big or ws.close_code == too_big:
            await coord.oversized(conn)
        else:
            log.info("websocket error from %s: %s", conn.remote, exc)


@routes.get("/ws")
async def control(request: web.Request) -> web.StreamResponse:
    coord = request.app[COORDINATOR]
    limits = _limits(request.app)
    remote = client_address(request)  # behind a --trust-proxy: the forwarded client
    if not limits.connects.allow(remote):  # before anything is signed or allocated
        return web.Response(status=429, text="too many connections from this address",
                            headers={"Retry-After": "1"})
    # aiohttp pings every heartbeat_s and closes a socket whose pong is heartbeat_s / 2 late
    ws = web.WebSocketResponse(max_msg_size=coord.config.max_frame,
                               heartbeat=coord.config.heartbeat_s)
    await ws.prepare(request)
    conn = Connection(ws=ws, remote=remote)
    closing: list[asyncio.Future[bool]] = []

    hello_seen = False

    def no_hello() -> None:  # a Hello that came in but waits for its turn is not closed
        if conn.peer is None and not hello_seen and not ws.closed:
            log.info("no hello from %s within %.0f s; closing", conn.remote, HELLO_TIMEOUT_S)
            closing.append(asyncio.ensure_future(ws.close()))

    hello_timer: asyncio.TimerHandle | None = None
    challenge, greeting = await limits.challenges.take_signed(coord)
    conn.challenge = challenge
    seen: dict[tuple[str, str | None], int] = {}
    try:
        await coord.send(conn, greeting)
        # from the Challenge sent (its signing, which waits under load, is not the node's time)
        hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT_S, no_hello)
        async for msg in ws:
            if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT) \
                    and await _stopped_at_socket(limits, conn, ws):
                break
            if msg.type == WSMsgType.BINARY and conn.peer is None:  # before handling it
                hello_seen = hello_seen or (len(msg.data) > 5 and msg.data[5] == Hello.TYPE)
            await _receive(coord, limits, conn, ws, msg, seen)
            reason = close_reason(conn)
            if reason is not None and not ws.closed:
                limits.closed_for_refusals += 1
                log.warning("closing %s after %s", conn.remote, reason)
                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=reason.encode()[:120])
                break
    finally:
        if hello_timer is not None:
            hello_timer.cancel()
        coord.disconnect(conn)
        if not hello_seen and conn.peer is None:  # never answered: safe to hand out again
            limits.challenges.give_back(challenge, greeting)
    return ws
