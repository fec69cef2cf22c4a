"""The round's public parameters and its sparse neighbour graph (SecAgg+).

Everyone derives the same graph from the round seed and the roster: nodes are ordered by
SHA-256(seed || node id) and each is joined to the k/2 nearest on either side of that ring (a
Harary graph over a pseudo-random permutation, as in Bell et al. 2020); k = n - 1 is the
complete graph. Shares of a participant's secrets go to its k neighbours with threshold
t = floor(k/2) + 1: a majority, so a server that lies about who dropped cannot collect both a
participant's self-mask shares and its pair-key shares from honest neighbours.

k is the smallest even degree for which, when each participant drops independently with
probability `dropout`, the chance that some participant keeps fewer than t live neighbours is
at most 2^-sigma (a union bound over n). That grows like log n (sigma + log2 n terms); for the
small rounds here it is often the complete graph.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from shared.secagg.fixedpoint import FixedPoint


def threshold(k: int) -> int:
    return k // 2 + 1


@cache
def _tail(k: int, t: int, dropout: float) -> float:
    """P[more than k - t of k neighbours drop]."""
    return sum(math.comb(k, d) * dropout ** d * (1 - dropout) ** (k - d)
               for d in range(k - t + 1, k + 1))


def choose_degree(n: int, *, dropout: float = 1 / 3, sigma: int = 20) -> int:
    if n < 2:
        raise ValueError("secure aggregation needs at least 2 participants")
    for k in range(2, n - 1, 2):
        if n * _tail(k, threshold(k), dropout) <= 2.0 ** -sigma:
            return k
    return n - 1


def neighbour_graph(seed: bytes, nodes: Sequence[str], k: int) -> dict[str, tuple[str, ...]]:
    """node -> its neighbours (sorted), the same for everyone who has (seed, nodes, k)."""
    n = len(nodes)
    if len(set(nodes)) != n:
        raise ValueError("duplicate node ids")
    if not 1 <= k <= n - 1:
        raise ValueError(f"degree {k} with {n} nodes")
    if k == n - 1:
        return {a: tuple(sorted(b for b in nodes if b != a)) for a in nodes}
    if k % 2:
        raise ValueError("a sparse graph needs an even degree")
    ring = sorted(nodes, key=lambda v: hashlib.sha256(seed + v.encode()).digest())
    half = k // 2
    out: dict[str, set[str]] = {v: set() for v in nodes}
    for i, v in enumerate(ring):
        for d in range(1, half + 1):
            w = ring[(i + d) % n]
            out[v].add(w)
            out[w].add(v)
    return {v: tuple(sorted(s)) for v, s in out.items()}


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundConfig:
    run_id: str  # the run (also the ML-DSA context string)
    round: int  # outer round number
    seed: bytes  # public round seed (e.g. from the coordinator's round open); 32 bytes
    dimension: int  # length of the whole update vector
    fixed_point: FixedPoint  # encoding into Z_2^32
    degree: int | None = None  # neighbours per participant; None: choose_degree(n)
    dropout: float = 1 / 3  # dropout rate the degree is sized for
    sigma: int = 20  # the graph may fail to recover with probability <= 2^-sigma

    def __post_init__(self) -> None:
        if len(self.seed) != 32:
            raise ValueError("the round seed is 32 bytes")
        if self.dimension < 1 or self.round < 0:
            raise ValueError("dimension >= 1 and round >= 0")

    def degree_for(self, n: int) -> int:
        k = self.degree if self.degree is not None else choose_degree(
            n, dropout=self.dropout, sigma=self.sigma)
        return min(k, n - 1)
