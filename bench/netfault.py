"""A loopback WebSocket relay that can drop or delay whole messages (fault injection).

`tc netem` is not available on our machines (docs/pitfalls.md, "Emulating a WAN"), so loss and
latency are injected at the transport, one WebSocket MESSAGE at a time: every data message
(binary or text) a client sends is forwarded to the upstream server, and every message the
server sends back is forwarded to the client, unless the seeded RNG drops it. Whole messages
are dropped, never TCP bytes, so framing stays valid and the receiver sees a message that never
arrived, not a corrupt one. Control frames (ping / pong) are answered per hop by aiohttp; a
close on either side closes the other.

    relay = RelayThread(upstream="127.0.0.1:8470", seed=1)
    port = relay.start()          # nodes use --coordinator 127.0.0.1:PORT
    relay.set_fault(drop=0.1, delay_s=0.02)
    ...
    relay.set_fault(drop=0.0)
    relay.stop()

`python -m bench.netfault --upstream HOST:PORT --drop 0.1` runs one in the foreground.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import threading
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

MAX_MESSAGE = 512 * 1024 * 1024
UP, DOWN = "up", "down"  # client -> server, server -> client


class Relay:
    """The relay itself; runs on the event loop that calls `start`."""

    def __init__(self, upstream: str, *, drop: float = 0.0, delay_s: float = 0.0,
                 seed: int = 0, host: str = "127.0.0.1", port: int = 0,
                 path: str = "/ws") -> None:
        self.upstream, self.host, self.port, self.path = upstream, host, port, path
        self.drop, self.delay_s = drop, delay_s
        self.rng = random.Random(seed)
        self.stats: Counter[str] = Counter()  # forwarded_up, dropped_down, connections, ...
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._sockets: set[Any] = set()
        self.cut_armed: int | None = None  # see cut_after_upload
        self.cut_down: list[int] | None = None  # see cut_after_download: [min_bytes, left]

    def set_fault(self, *, drop: float = 0.0, delay_s: float = 0.0) -> None:
        if not 0.0 <= drop <= 1.0 or delay_s < 0:
            raise ValueError(f"drop must be in [0, 1] and delay_s >= 0 (got {drop}, {delay_s})")
        self.drop, self.delay_s = drop, delay_s

    def decide(self) -> bool:
        """True: forward this message. One RNG draw per message, so a seed fixes the pattern."""
        return self.rng.random() >= self.drop

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get(self.path, self._handle)
        self._session = aiohttp.ClientSession()
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server  # the bound port when port=0
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self.port

    def cut_after_upload(self, min_bytes: int) -> None:
        """One shot: the next client message of >= min_bytes is forwarded, then that
        connection is closed before any reply can come back (the sender cannot know whether
        the server got it)."""
        self.cut_armed = min_bytes

    def cut_after_download(self, min_bytes: int, count: int = 1) -> None:
        """One shot: once `count` server messages of >= min_bytes have been forwarded to the
        client (chunks of a streamed RoundOpen), that connection is closed."""
        self.cut_down = [min_bytes, count]

    async def close(self) -> None:
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        assert self._session is not None
        try:  # upstream first: a server that is down is refused, as without the relay
            up = await self._session.ws_connect(f"ws://{self.upstream}{self.path}",
                                                max_msg_size=MAX_MESSAGE, heartbeat=20.0)
        except (aiohttp.ClientError, OSError) as exc:
            self.stats["upstream_refused"] += 1
            raise web.HTTPBadGateway(text=f"upstream {self.upstream}: {exc}") from exc
        down = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=20.0)
        await down.prepare(request)
        self.stats["connections"] += 1
        self._sockets.update((up, down))
        try:
            pumps = [asyncio.create_task(self._pump(down, up, UP)),
                     asyncio.create_task(self._pump(up, down, DOWN))]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._sockets.difference_update((up, down))
            await up.close()
            await down.close()
        return down

    async def _forward(self, dst: Any, msg: Any, direction: str) -> bool:
        """Send one message on dst and count it; False when dst is gone."""
        if dst.closed:
            return False
        try:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            else:
                await dst.send_str(msg.data)
        except (ConnectionError, RuntimeError):
            return False
        self.stats[f"forwarded_{direction}"] += 1
        return True

    async def _pump(self, src: Any, dst: Any, direction: str) -> None:
        """Forward src -> dst in order; ends when src closes."""
        async for msg in src:
            if msg.type not in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                continue
            if not self.decide():
                self.stats[f"dropped_{direction}"] += 1
                continue
            if self.delay_s > 0:
                await asyncio.sleep(self.delay_s)  # in order: one pump per direction
            if not await self._forward(dst, msg, direction):
                break
            if direction == UP and self.cut_armed is not None and len(msg.data) >= self.cut_armed:
                self.cut_armed = None
                self.stats["cut_after_upload"] += 1
                break  # the handler closes both sides
            cut = self.cut_down
            if direction == DOWN and cut is not None and len(msg.data) >= cut[0]:
                cut[1] -= 1
                if cut[1] <= 0:
                    self.cut_down = None
                    self.stats["cut_after_download"] += 1
                    break


class RelayThread:
    """A Relay on its own event loop in a daemon thread (for synchronous benchmarks/tests)."""

    def __init__(self, upstream: str, **kwargs: Any) -> None:
        self.relay = Relay(upstream, **kwargs)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="netfault-relay",
                                       daemon=True)

    def start(self) -> int:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self.relay.start(), self.loop).result(10)

    @property
    def port(self) -> int:
        return self.relay.port

    @property
    def stats(self) -> Counter[str]:
        return self.relay.stats

    def set_fault(self, *, drop: float = 0.0, delay_s: float = 0.0) -> None:
        self.loop.call_soon_threadsafe(lambda: self.relay.set_fault(drop=drop, delay_s=delay_s))

    def cut_after_upload(self, min_bytes: int) -> None:
        self.loop.call_soon_threadsafe(self.relay.cut_after_upload, min_bytes)

    def cut_after_download(self, min_bytes: int, count: int = 1) -> None:
        self.loop.call_soon_threadsafe(self.relay.cut_after_download, min_bytes, count)

    def stop(self) -> None:
        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.relay.close(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.netfault", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", required=True, help="server HOST:PORT")
    p.add_argument("--port", type=int, default=0, help="listen port (0: any free one)")
    p.add_argument("--drop", type=float, default=0.0, help="fraction of messages dropped")
    p.add_argument("--delay-s", type=float, default=0.0, help="delay added to each message")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    async def serve() -> None:
        relay = Relay(args.upstream, drop=args.drop, delay_s=args.delay_s, seed=args.seed,
                      port=args.port)
        port = await relay.start()
        print(f"relay 127.0.0.1:{port} -> {args.upstream} (drop {args.drop}, delay "
              f"{args.delay_s} s)", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await relay.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
