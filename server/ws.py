"""The control WebSocket: one per participant, binary frames only (shared.frame)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSCloseCode, WSMsgType, web

from server.keys import COORDINATOR
from server.peers import Connection
from shared.errors import FrameError

log = logging.getLogger("server.ws")
HELLO_TIMEOUT_S = 30.0  # a connection that has not said who it is by then is closed
routes = web.RouteTableDef()


@routes.get("/ws")
async def control(request: web.Request) -> web.WebSocketResponse:
    coord = request.app[COORDINATOR]
    # aiohttp pings every heartbeat_s and closes a socket whose pong is heartbeat_s / 2 late
    ws = web.WebSocketResponse(max_msg_size=coord.config.max_frame,
                               heartbeat=coord.config.heartbeat_s)
    await ws.prepare(request)
    conn = Connection(ws=ws, remote=str(request.remote))
    closing: list[asyncio.Future[bool]] = []

    def no_hello() -> None:
        if conn.peer is None and not ws.closed:
            log.info("no hello from %s within %.0f s; closing", conn.remote, HELLO_TIMEOUT_S)
            closing.append(asyncio.ensure_future(ws.close()))

    hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT_S, no_hello)
    try:
        await coord.greet(conn)
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                await coord.handle_frame(conn, msg.data)
            elif msg.type == WSMsgType.TEXT:
                await coord.reject(conn, FrameError(
                    "text messages are not part of the protocol: send binary frames"))
            elif msg.type == WSMsgType.ERROR:
                exc = msg.data if msg.data is not None else ws.exception()
                too_big = WSCloseCode.MESSAGE_TOO_BIG
                if getattr(exc, "code", None) == too_big or ws.close_code == too_big:
                    await coord.oversized(conn)
                else:
                    log.info("websocket error from %s: %s", conn.remote, exc)
    finally:
        hello_timer.cancel()
        coord.disconnect(conn)
    return ws
