"""Aggregation rules: pure functions over a stack of update vectors, one registry by name.

The working core ships `mean`; robust rules (median, trimmed mean, Krum, ...) join RULES
under their config names without touching any caller.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from shared.vec import Vector, is_numpy, numpy_module, same_kind

Rule = Callable[[Sequence[Vector]], Vector]


def mean(updates: Sequence[Vector]) -> Vector:
    """Coordinate-wise arithmetic mean of the updates."""
    if not updates:
        raise ValueError("mean of no updates")
    n = len(updates[0])
    if any(len(u) != n for u in updates):
        raise ValueError("updates differ in length")
    if all(is_numpy(u) for u in updates):
        np = numpy_module()
        assert np is not None
        return np.mean(np.stack(updates).astype(np.float64), axis=0).astype(np.float32)
    k = len(updates)
    return same_kind(updates[0], [sum(col) / k for col in zip(*updates, strict=True)])


RULES: dict[str, Rule] = {"mean": mean}


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r}; known: {sorted(RULES)}") from None
