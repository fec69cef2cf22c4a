"""An in-memory network that drives DhtNodes on a simulated clock (tests, bench.dht).

The model, per message (one direction):

    delay  = base_ms + spread_ms * |place(a) - place(b)| / sqrt(2) + Exp(jitter_ms)
    lost   with probability `loss`, independently of everything else
    lost   when the receiver has left (no error comes back: it left without notice)
    lost   when sender and receiver are on different sides of a partition

Each address gets a random place in the unit square (a crude geography: a pair of nodes at
opposite corners is base + spread apart). Nothing is reordered on purpose, but jitter can
reorder two messages. Everything (places, delays, losses, the nodes' own seeds) is drawn from
one `random.Random(seed)`, and events at the same instant run in the order they were made, so
a run is repeatable given its seed and its identities.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shared.dht.lookup import LookupResult
from shared.dht.node import DhtNode

EPOCH = 1_800_000_000.0  # the simulated clock starts here (unix seconds, 2027)


@dataclass(frozen=True, kw_only=True)
class NetModel:
    base_ms: float = 10.0  # fixed one-way delay
    spread_ms: float = 140.0  # added for the farthest pair of places
    jitter_ms: float = 5.0  # mean of the exponential jitter
    loss: float = 0.01  # probability that a message is lost


class MemNet:
    def __init__(self, model: NetModel | None = None, *, seed: int = 0) -> None:
        self.model = model or NetModel()
        self.rng = random.Random(seed)
        self.now = EPOCH
        self.nodes: dict[str, DhtNode] = {}
        self.place: dict[str, tuple[float, float]] = {}
        self.side: dict[str, int] = {}  # partition: address -> side (empty: no partition)
        self.on_result: Callable[[str, LookupResult], None] | None = None
        self.counts = {"sent": 0, "delivered": 0, "lost": 0, "to_gone": 0, "partitioned": 0}
        self._heap: list[tuple[float, int, str, Any, Any, Any]] = []
        self._seq = 0
        self._timer_at: dict[str, float] = {}

    # -- membership -------------------------------------------------------------------------

    def node_seed(self) -> int:
        return self.rng.getrandbits(63)

    def add(self, addr: str, node: DhtNode, *, start: bool = True) -> None:
        self.nodes[addr] = node
        self.place.setdefault(addr, (self.rng.random(), self.rng.random()))
        if start:
            node.start(self.now)
        self.flush(addr)

    def remove(self, addr: str) -> DhtNode | None:
        """The node at `addr` leaves without a word: what is sent to it is lost."""
        self._timer_at.pop(addr, None)
        return self.nodes.pop(addr, None)

    def partition(self, side: dict[str, int]) -> None:
        self.side = dict(side)

    def heal(self) -> None:
        self.side = {}

    # -- the clock --------------------------------------------------------------------------

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self._push(when, "call", fn, None, None)

    def run_until(self, until: float) -> None:
        while self._heap and self._heap[0][0] <= until:
            when, _, kind, a, b, c = heapq.heappop(self._heap)
            self.now = max(self.now, when)
            if kind == "deliver":
                node = self.nodes.get(a)
                if node is None:
                    self.counts["to_gone"] += 1
                    continue
                self.counts["delivered"] += 1
                node.receive(b, c, self.now)
                self.flush(a)
            elif kind == "timer":
                if self._timer_at.get(a) != when or a not in self.nodes:
                    continue
                del self._timer_at[a]
                self.nodes[a].tick(self.now)
                self.flush(a)
            else:
                a()
        self.now = max(self.now, until)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    # -- plumbing ---------------------------------------------------------------------------

    def _push(self, when: float, kind: str, a: Any, b: Any, c: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, a, b, c))

    def delay(self, a: str, b: str) -> float:
        m = self.model
        (x1, y1), (x2, y2) = self.place.get(a, (0.5, 0.5)), self.place.get(b, (0.5, 0.5))
        far = math.hypot(x1 - x2, y1 - y2) / math.sqrt(2)
        return (m.base_ms + m.spread_ms * far + self.rng.expovariate(1 / m.jitter_ms)) / 1e3

    def flush(self, addr: str) -> None:
        node = self.nodes.get(addr)
        if node is None:
            return
        for dst, data in node.drain():
            self.counts["sent"] += 1
            if self.rng.random() < self.model.loss:
                self.counts["lost"] += 1
                continue
            if self.side and self.side.get(addr) != self.side.get(dst):
                self.counts["partitioned"] += 1
                continue
            self._push(self.now + self.delay(addr, dst), "deliver", dst, addr, data)
        if self.on_result is not None:
            for result in node.results():
                self.on_result(addr, result)
        due = node.next_deadline()
        held = self._timer_at.get(addr)
        if held is None or due < held:
            self._timer_at[addr] = due
            self._push(due, "timer", addr, None, None)
