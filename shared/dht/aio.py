"""An asyncio driver for DhtNode: the piece a carrier plugs into.

    service = DhtService(node, send)     # send(addr, data): the carrier's way out
    task = asyncio.create_task(service.run())
    service.deliver(src_addr, data)      # the carrier calls this for each DHT message in
    result = await service.find(node_id) # a node lookup; LookupResult
    service.close()

The carrier decides what an address is (a data channel label, the server's relay, a test
queue) and must only report as `src` an address it has authenticated (docs/dht.md, "Who sent
it"). The clock is the event loop's, offset to unix time (records expire in unix seconds).
stdlib only: the tab's event loop runs it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from shared.dht.lookup import LookupResult
from shared.dht.node import DhtNode


class DhtService:
    def __init__(self, node: DhtNode, send: Callable[[str, bytes], None]) -> None:
        self.node = node
        self._send = send
        self._loop = asyncio.get_running_loop()
        self._offset = time.time() - self._loop.time()
        self._wake = asyncio.Event()
        self._waiting: dict[int, asyncio.Future[LookupResult]] = {}
        self._closed = False

    def now(self) -> float:
        return self._loop.time() + self._offset

    def start(self) -> None:
        self.node.start(self.now())
        self._flush()

    def rejoin(self) -> None:
        """Ping the bootstrap addresses now (a restarted bootstrap has an empty table)."""
        self.start()

    def deliver(self, src: str, data: bytes) -> None:
        self.node.receive(src, data, self.now())
        self._flush()

    async def find(self, node_id: str, *, stop_on_found: bool = True) -> LookupResult:
        lid = self.node.lookup(node_id, self.now(), stop_on_found=stop_on_found)
        fut: asyncio.Future[LookupResult] = self._loop.create_future()
        self._waiting[lid] = fut
        self._flush()
        return await fut

    async def run(self) -> None:
        """Fire the node's timers until close()."""
        while not self._closed:
            delay = max(0.0, self.node.next_deadline() - self.now())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            if self._closed:
                break
            if self.node.next_deadline() <= self.now():
                self.node.tick(self.now())
                self._flush()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        for fut in self._waiting.values():
            fut.cancel()
        self._waiting.clear()

    def _flush(self) -> None:
        for addr, data in self.node.drain():
            self._send(addr, data)
        for result in self.node.results():
            fut = self._waiting.pop(result.lookup_id, None)
            if fut is not None and not fut.done():
                fut.set_result(result)
        self._wake.set()  # the next deadline may have moved earlier


class DhtHost:
    """A carrier's lifetime around one DhtService: the running task and the sends it spawned
    (server.dht and native_node.dht subclass it and supply `_send`)."""

    def __init__(self) -> None:
        self.service: DhtService | None = None
        self._task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Future[None]] = set()

    def _send(self, addr: str, data: bytes) -> None:
        raise NotImplementedError

    def _launch(self, node: DhtNode) -> None:
        """Start `node` on the running loop, sending through `self._send`."""
        self.service = DhtService(node, self._send)
        self.service.start()
        self._task = asyncio.create_task(self.service.run(), name="dht")

    def _spawn(self, coro: Awaitable[None]) -> None:
        fut = asyncio.ensure_future(coro)
        self._sends.add(fut)
        fut.add_done_callback(self._sends.discard)

    async def close(self) -> None:
        if self.service is not None:
            self.service.close()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        for fut in list(self._sends):
            fut.cancel()
