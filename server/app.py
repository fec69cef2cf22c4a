"""aiohttp application: routes, state, and the round loop as a cleanup context."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from server import api, browser_assets, browser_data, ledger_api, ws
from server.coordinator import Coordinator
from server.dht import ServerDht
from server.keys import COORDINATOR, RUN
from server.runstate import RunState
from server.signer import SigningPool

log = logging.getLogger("server.app")


def make_app(run: RunState) -> web.Application:
    app = web.Application(client_max_size=run.config.max_frame)
    app[RUN] = run
    app[COORDINATOR] = Coordinator(run)
    app.add_routes(api.routes)
    app.add_routes(ledger_api.routes)  # /api/ledger... (server/ledger_api.py)
    app.add_routes(ws.routes)
    ws.setup(app)  # rate limits (server/ws.py)
    app.add_routes(browser_assets.routes)  # before /static/: the browser node's assets
    app.add_routes(browser_data.routes)
    app.on_startup.append(browser_assets.build_at_startup)
    static = Path(api.BROWSER_DIR)
    if static.is_dir():
        app.router.add_static("/static/", static)
    app.cleanup_ctx.append(_signing_pool)  # before the round loop: closed after it
    app.cleanup_ctx.append(_dht)
    app.cleanup_ctx.append(_round_loop)
    app.on_shutdown.append(_close_sockets)
    return app


async def _signing_pool(app: web.Application) -> AsyncIterator[None]:
    """Per-connection frames (Acks, Welcomes, Challenges) signed off the event loop."""
    coord, run = app[COORDINATOR], app[RUN]
    pool = SigningPool(run.identity, run.run_id) if run.identity is not None else None
    coord.outbox.signer = pool
    yield
    coord.outbox.signer = None
    if pool is not None:
        pool.close()


async def _dht(app: web.Application) -> AsyncIterator[None]:
    """The server's Kademlia node and the DHT relay (run config `dht`, server.dht)."""
    coord, run = app[COORDINATOR], app[RUN]
    if not run.config.dht or run.identity is None:
        yield
        return
    coord.dht = ServerDht(coord.outbox, run.identity, run.run_id, coord.counters)
    coord.dht.start()
    yield
    await coord.dht.close()
    coord.dht = None


async def _round_loop(app: web.Application) -> AsyncIterator[None]:
    coord = app[COORDINATOR]
    task = asyncio.create_task(coord.run_rounds(), name="round-loop")
    task.add_done_callback(_report_crash)
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # a crash was already reported
    app[RUN].store.close()


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("round loop crashed", exc_info=task.exception())


async def _close_sockets(app: web.Application) -> None:
    await app[COORDINATOR].rtc.close_all()
    for peer in list(app[COORDINATOR].peers.values()):
        if peer.ws is not None:
            await peer.ws.close()
