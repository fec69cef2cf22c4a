"""Secure and robust together: secure aggregation inside groups, a robust rule over the groups.

A round's participants are split into g groups; each group runs its own secure-aggregation
round (shared.secagg: the server learns only the group's sum and who is in it), and the
server combines the group MEANS with a robust rule (median, trimmed mean, centered clipping;
shared.aggregation), after scoring each group mean on its held-out probe (validation at group
level, shared.validation). The trade-off (docs/privacy.md, "Groups"):

- privacy holds at group level: the server sees the sum of each group of >= `min_size`
  participants, not one participant's update (with n - 1 colluders in a group of n, the
  last one's update is their sum minus their own, as for any secure aggregation);
- robustness holds while attackers hold fewer than half the groups: one attacker spoils the
  whole mean of its group, so f attackers can spoil up to f groups, and a robust rule over
  g groups tolerates at most (g - 1) // 2 of them. `group_count` asks for g = 2f + 1, so
  that f attackers cannot reach half even if each lands in a different group, capped so
  that every group keeps `min_size` members.

Group membership is drawn from the round seed (SHA-256 of seed and node id, the ring cut in
g contiguous arcs), so nobody chooses its group, and everyone holding the seed and the
roster computes the same groups. Each group's secure-aggregation round gets its own seed,
`group_seed`, so that masks never repeat across groups.

Pure functions; stdlib at import time (vectors follow shared.vec).
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from shared.aggregation import get_rule, max_f
from shared.validation import Score, judge, reference
from shared.vec import Vector, is_numpy, numpy_module

MIN_SIZE = 3  # the fewest participants whose sum the server may see


def group_count(participants: int, attacker_fraction: float, *,
                min_size: int = MIN_SIZE) -> int:
    """How many groups for `participants` when up to `attacker_fraction` of them may attack:
    2f + 1 for f = floor(fraction * n), so that the attackers hold fewer than half the
    groups wherever they land, but never so many that a group has fewer than `min_size`
    members (then robustness rests on where the draw puts the attackers: `spoiled`). One
    group (plain secure aggregation) when no attacker is assumed or n < 2 * min_size."""
    if participants < 1:
        raise ValueError(f"participants must be >= 1, got {participants}")
    if not 0.0 <= attacker_fraction < 0.5:
        raise ValueError(f"attacker_fraction must be in [0, 0.5), got {attacker_fraction!r}")
    if min_size < 2:
        raise ValueError("a secure-aggregation group needs at least 2 members")
    f = math.floor(participants * attacker_fraction)
    return max(1, min(2 * f + 1, participants // min_size))


def tolerated(groups: int) -> int:
    """The most spoiled groups a robust rule over `groups` group means can outvote."""
    return max(0, (groups - 1) // 2)


def _rank(seed: bytes, node: str) -> bytes:
    return hashlib.sha256(b"daa-secagg-group|" + seed + b"|" + node.encode()).digest()


def assign(seed: bytes, nodes: Sequence[str], groups: int) -> tuple[tuple[str, ...], ...]:
    """The round's groups: `nodes` ordered by SHA-256(seed, node id) and cut into `groups`
    contiguous runs whose sizes differ by at most one (each run sorted). The same for
    everyone who holds (seed, nodes, groups); a node cannot pick its group."""
    if len(set(nodes)) != len(nodes):
        raise ValueError("duplicate node ids")
    if not 1 <= groups <= max(1, len(nodes)):
        raise ValueError(f"{groups} groups for {len(nodes)} nodes")
    if len(seed) != 32:
        raise ValueError("the round seed is 32 bytes")
    ring = sorted(nodes, key=lambda v: _rank(seed, v))
    size, extra = divmod(len(ring), groups)
    out, start = [], 0
    for i in range(groups):
        stop = start + size + (1 if i < extra else 0)
        out.append(tuple(sorted(ring[start:stop])))
        start = stop
    return tuple(out)


def group_seed(seed: bytes, index: int) -> bytes:
    """The secure-aggregation round seed of group `index` (32 bytes)."""
    return hashlib.sha256(b"daa-secagg-group-seed|" + seed + index.to_bytes(4, "big")).digest()


def spoiled(assignment: Sequence[Sequence[str]], attackers: Iterable[str]) -> int:
    """How many groups hold at least one of `attackers`."""
    bad = set(attackers)
    return sum(1 for g in assignment if bad.intersection(g))


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupSum:
    """One group's unmasked secure-aggregation result."""

    index: int  # the group's position in the assignment
    total: Vector  # the decoded sum of its contributors' updates (float64 or float32)
    count: int  # how many updates the sum holds (survivors of the group's round)

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"group {self.index}: a sum of {self.count} updates")


def group_mean(s: GroupSum) -> Vector:
    """The group's mean update as float32 (numpy in, numpy out; else array('f'))."""
    if is_numpy(s.total):
        np = numpy_module()
        assert np is not None
        return (np.asarray(s.total, dtype=np.float64) / s.count).astype(np.float32)
    return array("f", [float(x) / s.count for x in s.total])


def validate(base: float | None, losses: Sequence[float | None], *,
             threshold: float) -> list[bool]:
    """Validation at group level: which group means to keep, given the held-out loss of
    the global params (`base`) and of the params each group mean would give (`losses`,
    None when not finite). The rule of shared.validation with a group in place of a node:
    reject a mean whose loss exceeds max(base, median of the losses) by more than
    `threshold`. A spoiled group is caught as a whole; an honest group's mean is not."""
    ref = reference(base, losses)
    return [judge(ref=ref, score=Score(node_id=f"group-{i}", digest="", loss=v),
                  threshold=threshold).ok for i, v in enumerate(losses)]


def combine(sums: Sequence[GroupSum], *, rule: str, f: int,
            keep: Sequence[bool] | None = None, **params: Any) -> Vector:
    """The round's update: `rule` (a shared.aggregation name) over the means of the groups
    in `sums` (those whose round unmasked; a group that failed is simply absent) that
    `keep` marks (validation; None keeps all). f, the spoiled groups to tolerate, is
    clamped to what the rule supports for that many means. ValueError if none is left."""
    chosen = [s for i, s in enumerate(sums) if keep is None or keep[i]]
    if not chosen:
        raise ValueError("no group mean is left to combine")
    means = [group_mean(s) for s in chosen]
    fn: Callable[..., Vector] = get_rule(rule)
    f_ok = max(0, min(f, max_f(rule, len(means))))
    return fn(means, f=f_ok, **params)
