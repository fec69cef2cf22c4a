"""The control WebSocket: one per participant, binary frames only (shared.frame)."""

from __future__ import annotations

import logging

from aiohttp import WSCloseCode, WSMsgType, web

from server.keys import COORDINATOR
from server.peers import Connection
from shared.errors import FrameError

log = logging.getLogger("server.ws")
routes = web.RouteTableDef()


@routes.get("/ws")
async def control(request: web.Request) -> web.WebSocketResponse:
    coord = request.app[COORDINATOR]
    ws = web.WebSocketResponse(max_msg_size=coord.config.max_frame, heartbeat=20.0)
    await ws.prepare(request)
    conn = Connection(ws=ws, remote=str(request.remote))
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
        coord.disconnect(conn)
    return ws
