"""A native node's sending side of a streamed p2p reduction (design: shared/p2p_stream.py).

`PieceSender` sends this node's pieces (one shard slice, at most a chunk, per signed `Shard`
frame) to each owner in shard order, with at most `window` of them not yet acknowledged per
owner. The path each piece went on is remembered (the owner's data channel at that moment, or
the server's relay); when that channel is gone (closed, dropped, or replaced by a fresh one)
every piece still in flight goes again, in order, from the first not acknowledged, over the
current path. Payloads are cut from the update when sent, so the queues hold indices only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING

from shared.messages import Shard
from shared.p2p_stream import DEFAULT_WINDOW
from transport.rtc import FrameLink

if TYPE_CHECKING:
    from native_node.p2p import P2PRole

log = logging.getLogger("native_node.p2p_send")
Path = FrameLink | None  # None: through the server's relay


class PieceSender:
    def __init__(self, role: P2PRole, *, window: int = DEFAULT_WINDOW) -> None:
        self.role, self.window = role, window
        self.queues: dict[str, deque[int]] = {}  # owner -> shards still to send, in order
        self.inflight: dict[str, dict[int, Path]] = {}  # owner -> shard -> path, sent order
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.wake: dict[str, asyncio.Event] = {}
        self.pieces_sent = self.pieces_resent = self.resumes = 0
        self.max_frame = 0  # the largest piece frame sent (bytes, signed)

    def reset(self) -> None:
        """A new round, or members left (every piece goes again under the new plan)."""
        for t in self.tasks.values():
            t.cancel()
        self.queues, self.inflight, self.tasks, self.wake = {}, {}, {}, {}

    def add(self, to: str, shard: int) -> None:
        self.queues.setdefault(to, deque()).append(shard)
        self.inflight.setdefault(to, {})
        self._kick(to)

    def acked(self, owner: str, shard: int) -> None:
        """The owner has the piece (reduced with the others' pieces of its shard)."""
        self.inflight.get(owner, {}).pop(shard, None)
        queue = self.queues.get(owner)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(shard)  # requeued after a lost channel, then acknowledged
            self._kick(owner)

    def _kick(self, to: str) -> None:
        self.wake.setdefault(to, asyncio.Event()).set()
        task = self.tasks.get(to)
        if task is None or task.done():
            self.tasks[to] = asyncio.ensure_future(self._pump(to))

    async def _pump(self, to: str) -> None:
        queue, flight, wake = self.queues[to], self.inflight[to], self.wake[to]
        try:
            while queue or flight:
                wake.clear()
                link = self.role.mesh.links.get(to)
                if any(p is not None and p is not link for p in flight.values()):
                    # the channel these went on is gone: from the first not acknowledged
                    self.resumes += 1
                    self.pieces_resent += len(flight)
                    log.info("p2p: channel to %s lost with %d pieces in flight; resending "
                             "from shard %d", to[:12], len(flight), next(iter(flight)))
                    queue.extendleft(reversed(list(flight)))
                    flight.clear()
                while queue and len(flight) < self.window:
                    shard = queue.popleft()
                    flight[shard] = await self._send(to, shard)
                if queue or flight:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), timeout=0.5)
        except (ConnectionError, ValueError) as exc:
            log.warning("p2p: sending pieces to %s failed: %s", to[:12], exc)

    async def _send(self, to: str, shard: int) -> Path:
        role = self.role
        r = role.reducer
        assert r is not None
        lo, hi = r.plan.bounds(shard)
        data = role.frame(Shard(run_id=role.run_id, round=r.plan.round, node_id=role.me, to=to,
                                kind="part", shard=shard, revision=r.plan.revision,
                                payload=bytes(r.raw[4 * lo:4 * hi])))
        self.pieces_sent += 1
        self.max_frame = max(self.max_frame, len(data))
        await role.first_channel(to)
        link = role.mesh.links.get(to)
        if link is not None:
            try:
                if await role.mesh.send(to, data):
                    role.sent_direct += 4 * (hi - lo)
                    return link
            except (ConnectionError, TimeoutError) as exc:
                log.info("p2p: channel to %s failed mid-send (%s): relaying", to[:12], exc)
        role.sent_relayed += 4 * (hi - lo)
        await role.send_ws(data)
        return None
