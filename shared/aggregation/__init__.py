"""Aggregation rules: pure functions over a stack of update vectors, one registry by name.

    rule = get_rule(config.aggregator)             # ValueError listing the known names
    f = estimate_f(len(updates), 0.2, rule=config.aggregator)
    aggregate = rule(updates, f=f)                 # + the rule's own keyword parameters

A `Rule` is a callable `(updates: Sequence[Vector], *, f: int = 0, **params) -> Vector`.
f is the number of arbitrary (Byzantine) updates to tolerate; rules that do not need it
accept and ignore it. Every rule validates its input: an empty stack, unequal lengths, a
NaN/inf value (naming the update) and an f outside the rule's bound raise ValueError.
Results are float32 Vectors of the inputs' kind (numpy in, numpy out; array('f') in, array
out); all arithmetic is float64, rounded to float32 once at the end, except the mean of float32
updates: a float32 running sum, as byzfl's and Flower's (float64 where it overflows). The
numpy path never copies the stack: it reads the callers' float32 arrays one column block at a
time and widens that block to float64 (shared/aggregation/_stack.py; the mean adds each row
once into a float32 accumulator, the sorting rules fill a block directly), and the Krum family and
the geometric median take their distances from one Gram product (bench.agg_speed times every
rule against byzfl and Flower on one thread).

| name              | function            | params (defaults)                   | needs      |
|-------------------|---------------------|-------------------------------------|------------|
| mean              | mean                | -                                   | -          |
| median            | median              | -                                   | -          |
| trimmed-mean      | trimmed_mean        | -                                   | n >= 2f+1  |
| krum              | krum_aggregate      | - (krum() gives the index)          | n >= 2f+3  |
| multi-krum        | multi_krum          | m=n-f                               | n >= 2f+3  |
| bulyan            | bulyan              | -                                   | n >= 4f+3  |
| geometric-median  | geometric_median    | eps=1e-6, tol=1e-7, max_iter=200    | -          |
| centered-clipping | centered_clipping   | tau=10.0, iterations=1, reference   | -          |

Pre-aggregators (`PRE_AGGREGATORS`, stack -> new stack, then apply a rule):
bucketing(s=2, seed) and nnm (n >= 2f+1).

Pure Python vs numpy (the fast path when every update is a numpy array):
- bit-identical: mean, median, trimmed-mean, and bucketing (same operations in the same order);
- bit-identical unless two scores/distances tie within float64 rounding (~1e-15 relative to
  the largest distance): krum, multi-krum, bulyan, nnm. Pure Python sums the squared
  differences with math.fsum; numpy takes ||a||^2 + ||b||^2 - 2ab from one Gram product of
  the stack centered on its per-coordinate midrange; selection and averaging are then shared,
  so outputs differ only if a near-tie flips a choice (exact ties are broken the same way on
  both paths, and identical updates are at distance 0 on both);
- within 1e-6 relative (to the inputs' magnitude): geometric-median, centered-clipping.
Permuting the stack: exactly the same result for median, trimmed-mean, krum (the vector),
multi-krum, bulyan (ties are broken by the vector, never by position); within 1e-6 relative
for mean, geometric-median and centered-clipping; nnm permutes its output alike; bucketing
depends on the order by design (seeded shuffle of positions).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

from shared.aggregation.coordinate import mean, median, trimmed_mean
from shared.aggregation.geometric import (
    GeometricMedian,
    centered_clipping,
    geometric_median,
    geometric_median_info,
)
from shared.aggregation.krum import (
    bulyan,
    bulyan_select,
    krum,
    krum_aggregate,
    krum_scores,
    multi_krum,
    multi_krum_select,
)
from shared.aggregation.pre import bucketing, nnm
from shared.vec import Vector

__all__ = [
    "PRE_AGGREGATORS",
    "RULES",
    "GeometricMedian",
    "PreAggregator",
    "Rule",
    "bucketing",
    "bulyan",
    "bulyan_select",
    "centered_clipping",
    "estimate_f",
    "geometric_median",
    "geometric_median_info",
    "get_pre_aggregator",
    "get_rule",
    "krum",
    "krum_aggregate",
    "krum_scores",
    "max_f",
    "mean",
    "median",
    "multi_krum",
    "multi_krum_select",
    "nnm",
    "trimmed_mean",
]

# (updates: Sequence[Vector], *, f: int = 0, **params) -> Vector. Callable[..., ...] because
# each rule takes its own keyword parameters (an unknown one raises TypeError).
Rule = Callable[..., Vector]
# (updates: Sequence[Vector], *, f: int = 0, **params) -> list[Vector]
PreAggregator = Callable[..., list[Vector]]

RULES: dict[str, Rule] = {
    "mean": mean,
    "median": median,
    "trimmed-mean": trimmed_mean,
    "krum": krum_aggregate,
    "multi-krum": multi_krum,
    "bulyan": bulyan,
    "geometric-median": geometric_median,
    "centered-clipping": centered_clipping,
}

PRE_AGGREGATORS: dict[str, PreAggregator] = {"bucketing": bucketing, "nnm": nnm}

# Largest f a rule accepts (or, for rules that ignore f, its breakdown point) for n updates.
_MAX_F: dict[str, Callable[[int], int]] = {
    "mean": lambda n: 0,  # one arbitrary update moves the mean anywhere
    "median": lambda n: (n - 1) // 2,
    "trimmed-mean": lambda n: (n - 1) // 2,
    "krum": lambda n: (n - 3) // 2,
    "multi-krum": lambda n: (n - 3) // 2,
    "bulyan": lambda n: (n - 3) // 4,
    "geometric-median": lambda n: (n - 1) // 2,
    "centered-clipping": lambda n: (n - 1) // 2,
    "nnm": lambda n: (n - 1) // 2,
}
assert set(_MAX_F) == set(RULES) | {"nnm"}


def get_rule(name: str) -> Rule:
    """The rule registered under `name` (a config value)."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown aggregator {name!r}; known: {sorted(RULES)}") from None


def get_pre_aggregator(name: str) -> PreAggregator:
    """The pre-aggregator registered under `name`."""
    try:
        return PRE_AGGREGATORS[name]
    except KeyError:
        raise ValueError(f"unknown pre-aggregator {name!r}; "
                         f"known: {sorted(PRE_AGGREGATORS)}") from None


def max_f(rule: str, n: int) -> int:
    """The largest f `rule` (a RULES name, or "nnm") supports with n updates: its bound on n
    (trimmed-mean, krum, multi-krum, bulyan, nnm) or its breakdown point (median, geometric
    median, centered clipping; 0 for mean). -1 when n is too small for even f = 0."""
    if rule not in _MAX_F:
        raise ValueError(f"unknown aggregator {rule!r}; known: {sorted(_MAX_F)}")
    return max(_MAX_F[rule](n), -1)


def estimate_f(n: int, fraction: float, *, rule: str | None = None) -> int:
    """f for n updates when up to `fraction` of them may be arbitrary: floor(n * fraction),
    clamped to what `rule` supports when a rule name is given (ValueError if n is too small
    for that rule even with f = 0)."""
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"estimate_f: n={n} is negative")
    if not (isinstance(fraction, int | float) and 0.0 <= fraction < 1.0):
        raise ValueError(f"estimate_f: fraction={fraction!r} must be in [0, 1)")
    f = math.floor(round(n * fraction, 9))  # 0.29 * 100 = 28.999999999999996 means 29
    if rule is not None:
        top = max_f(rule, n)
        if top < 0:
            raise ValueError(f"estimate_f: {rule} cannot aggregate n={n} updates")
        f = min(f, top)
    return f
