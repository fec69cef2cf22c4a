"""Pre-aggregation: functions from a stack to a new stack, applied before a rule.

    mixed = nnm(updates, f=f)                       # or bucketing(updates, s=2, seed=round_seed)
    aggregate = get_rule("krum")(mixed, f=f)

Both keep the stack's kind (numpy or array('f')) and round each new vector to float32.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import cmp_to_key

from shared.aggregation._stack import check_f, check_int, prepare
from shared.vec import Vector


def bucketing(updates: Sequence[Vector], *, f: int = 0, s: int = 2, seed: int) -> list[Vector]:
    """Bucketing (Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets
    via Bucketing", ICLR 2022): shuffle the stack, cut it into ceil(n / s) buckets of s
    updates (the last one may be smaller) and return the mean of each bucket, in bucket order.
    Then apply any rule to the result: f arbitrary updates still spoil at most f buckets, so
    pass the same f (it must fit that rule's bound for ceil(n / s) updates).

    The shuffle is `random.Random(seed).shuffle`, the same permutation on every Python and in
    Pyodide. The seed is the caller's: draw a fresh, unpredictable one per round (e.g. from the
    round's randomness), or the buckets can be anticipated. f is accepted and ignored."""
    stack = prepare(updates, "bucketing")
    check_f("bucketing", f, stack.n)
    s = check_int("bucketing", "s", s, low=1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"bucketing: seed must be an integer, got {seed!r}")
    order = list(range(stack.n))
    random.Random(seed).shuffle(order)
    return [stack.vector(stack.mean_of(order[b:b + s])) for b in range(0, stack.n, s)]


def nnm(updates: Sequence[Vector], *, f: int = 0) -> list[Vector]:
    """Nearest-neighbour mixing (Allouah et al., "Fixing by Mixing: A Recipe for Optimal
    Byzantine ML under Heterogeneity", AISTATS 2023): replace each update by the mean of its
    n - f nearest neighbours in Euclidean distance, itself included. Needs n >= 2f + 1.

    Returns the new stack in the input's order. Neighbours are ranked by (distance, vector
    lexicographically, index) and summed in that order, so the result depends only on the
    multiset of updates (permuting the input permutes the output alike). Distances are as in
    Krum: pure and numpy agree bit for bit except at near-ties in distance."""
    stack = prepare(updates, "nnm")
    f = check_f("nnm", f, stack.n, min_n=(2, 1))
    dist = stack.sq_distances()
    k = stack.n - f
    out = []
    for i in range(stack.n):
        row = dist[i]

        def cmp(a: int, b: int, row: list[float] = row) -> int:
            if row[a] != row[b]:
                return -1 if row[a] < row[b] else 1
            return stack.lex_cmp(a, b) or (a > b) - (a < b)

        near = sorted(range(stack.n), key=cmp_to_key(cmp))[:k]
        out.append(stack.vector(stack.mean_of(near)))
    return out
