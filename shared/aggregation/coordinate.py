"""Coordinate-wise rules: mean, median, trimmed mean, and Bulyan's median-window mean.

Every value is computed in float64 and rounded to float32 once, at the end. Sums run left to
right over values sorted ascending (or, for `mean`, in stack order) on both backends, so the
pure and numpy paths give bit-identical results. Sorting makes median and trimmed mean exactly
permutation-invariant too; a final `+ 0.0` turns -0.0 into 0.0 so that not even the sign of a
zero depends on the order of the stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.aggregation._stack import Stack, check_f, prepare
from shared.vec import Vector


def mean(updates: Sequence[Vector], *, f: int = 0) -> Vector:
    """Coordinate-wise arithmetic mean. Not robust: one update can move it anywhere.

    f is accepted and ignored. Sums run in stack order, so the pure and numpy paths agree
    exactly; a permuted stack may differ in the last float32 bit."""
    stack = prepare(updates, "mean")
    check_f("mean", f, stack.n)
    return stack.vector(stack.mean_of(range(stack.n)))


def _median_of_sorted(col: Sequence[float]) -> float:
    n = len(col)
    m = n // 2
    return (col[m] if n % 2 else (col[m - 1] + col[m]) / 2) + 0.0


def median(updates: Sequence[Vector], *, f: int = 0) -> Vector:
    """Coordinate-wise median; for an even count, the mean of the two middle values.

    f is accepted and ignored (the median tolerates up to (n - 1) // 2 arbitrary updates)."""
    stack = prepare(updates, "median")
    check_f("median", f, stack.n)
    return stack.vector(median_values(stack, range(stack.n)))


def median_values(stack: Stack, idx: Sequence[int]) -> Any:
    n = len(idx)
    m = n // 2
    if stack.np is not None:
        rows = stack.rows if n == stack.n else stack.rows[list(idx)]
        S = stack.np.sort(rows, axis=0)
        return (S[m] if n % 2 else (S[m - 1] + S[m]) / 2) + 0.0
    rows = stack.rows
    return [_median_of_sorted(sorted(col)) for col in zip(*(rows[i] for i in idx), strict=True)]


def trimmed_mean(updates: Sequence[Vector], *, f: int = 0) -> Vector:
    """Coordinate-wise mean after dropping the f largest and f smallest values.

    Needs n >= 2f + 1 (at least one value left). With f = 0 this is the mean (summed in
    sorted order, so it may differ from `mean` in the last bit)."""
    stack = prepare(updates, "trimmed-mean")
    f = check_f("trimmed-mean", f, stack.n, min_n=(2, 1))
    n = stack.n
    k = n - 2 * f
    if stack.np is not None:
        S = stack.np.sort(stack.rows, axis=0)
        acc = S[f].copy()
        for r in range(f + 1, n - f):
            acc += S[r]
        return stack.vector(acc / k + 0.0)
    out = []
    for col in zip(*stack.rows, strict=True):
        c = sorted(col)
        s = c[f]
        for x in c[f + 1:n - f]:
            s += x
        out.append(s / k + 0.0)
    return stack.vector(out)


def mean_around_median(stack: Stack, idx: Sequence[int], beta: int) -> Any:
    """Bulyan's second stage over the rows idx: per coordinate, the mean of the beta values
    closest to the median of those rows (float64 values).

    "Closest" orders values by (|x - median|, x): an exact tie in distance keeps the smaller
    value, so the result depends only on the multiset of values. The kept values always form
    a contiguous run of the sorted column; they are summed in ascending order."""
    if stack.np is not None:
        np = stack.np
        S = np.sort(stack.rows[list(idx)], axis=0)
        n = len(idx)
        m = n // 2
        med = S[m] if n % 2 else (S[m - 1] + S[m]) / 2
        order = np.lexsort((S, np.abs(S - med)), axis=0)[:beta]
        kept = np.sort(np.take_along_axis(S, order, axis=0), axis=0)
        acc = kept[0].copy()
        for r in range(1, beta):
            acc += kept[r]
        return acc / beta + 0.0
    rows = stack.rows
    out = []
    for col in zip(*(rows[i] for i in idx), strict=True):
        c = sorted(col)
        med = _median_of_sorted(c)

        def closeness(x: float, med: float = med) -> tuple[float, float]:
            return abs(x - med), x

        kept = sorted(sorted(c, key=closeness)[:beta])
        s = kept[0]
        for x in kept[1:]:
            s += x
        out.append(s / beta + 0.0)
    return out
