"""Coordinate-wise rules: mean, median, trimmed mean, and Bulyan's median-window mean.

Every value is computed in float64 and rounded to float32 once, at the end. Sums run left to
right over values sorted ascending (or, for `mean`, in stack order) on both backends, so the
pure and numpy paths give bit-identical results. Sorting makes median and trimmed mean exactly
permutation-invariant too; a final `+ 0.0` turns -0.0 into 0.0 so that not even the sign of a
zero depends on the order of the stack.

The numpy path never widens the whole stack: it sorts one column block at a time, transposed
so that each column is a contiguous run of n float32 values (numpy's SIMD sort), then sums the
kept values of the block in float64, in ascending order. `mean` reads the updates where they
are, one column block at a time, without stacking them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.aggregation._stack import (
    MEAN_FACTOR,
    SORT_FACTOR,
    Stack,
    block_width,
    check_f,
    check_shapes,
    prepare,
    running_sum,
)
from shared.vec import Vector, is_numpy, numpy_module


def mean(updates: Sequence[Vector], *, f: int = 0) -> Vector:
    """Coordinate-wise arithmetic mean. Not robust: one update can move it anywhere.

    f is accepted and ignored. Sums run in stack order, so the pure and numpy paths agree
    exactly; a permuted stack may differ in the last float32 bit."""
    np = numpy_module()
    if np is not None and all(is_numpy(u) and u.dtype == np.float32 for u in updates):
        n, d = check_shapes(updates, "mean")
        check_f("mean", f, n)
        out = np.empty(d, dtype=np.float32)
        w = block_width(1, MEAN_FACTOR)
        acc, tmp = np.empty(w), np.empty(w)
        bad = False
        with np.errstate(all="ignore"):  # a NaN or inf input: reported below
            for c in range(0, d, w):
                a = running_sum(np, updates, c, w, acc, tmp)
                bad = bad or not np.isfinite(a).all()
                a /= n
                out[c:c + len(a)] = a  # the one rounding to float32
        if bad:
            prepare(updates, "mean").raise_not_finite()  # names the bad update
        return out
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
    if stack.np is not None:
        np = stack.np
        out = np.empty(stack.d, dtype=np.float32)
        for c, S in sorted_blocks(stack, range(stack.n)):
            out[c:c + S.shape[0]] = _middle(np, S)  # the one rounding to float32
        return out
    return stack.vector(median_values(stack, range(stack.n)))


def _middle(np: Any, S: Any) -> Any:
    """Numpy path: the median of each sorted row of S, float64, no -0.0."""
    n = S.shape[1]
    m = n // 2
    lo = S[:, m - 1 if n % 2 == 0 else m].astype(np.float64)
    if n % 2 == 0:
        lo += S[:, m]
        lo /= 2
    lo += 0.0
    return lo


def median_values(stack: Stack, idx: Sequence[int]) -> Any:
    if stack.np is not None:
        np = stack.np
        out = np.empty(stack.d, dtype=np.float64)
        for c, S in sorted_blocks(stack, idx):
            out[c:c + S.shape[0]] = _middle(np, S)
        return out
    rows = stack.rows
    return [_median_of_sorted(sorted(col)) for col in zip(*(rows[i] for i in idx), strict=True)]


def sorted_blocks(stack: Stack, idx: Sequence[int], width: int | None = None) -> Any:
    """Numpy path: (first column, S) per column block, S[j] = the values of column c + j over
    the rows idx, sorted ascending (a (width, len(idx)) array of the stack's dtype; one
    buffer, refilled for the next block). Each row's slice is written straight into its
    column of S (no stacked copy, no transposition pass), then every row of S is sorted
    (numpy's SIMD sort of contiguous runs). Checks finiteness on the way (NaN sorts last,
    inf first or last)."""
    np = stack.np
    assert np is not None
    rows = [stack.rows[i] for i in idx]
    k = len(rows)
    w = block_width(k, SORT_FACTOR) if width is None else width
    buf = np.empty((w, k), dtype=rows[0].dtype)
    for c in range(0, stack.d, w):
        e = min(stack.d, c + w) - c
        S = buf[:e]
        for j, r in enumerate(rows):
            S[:, j] = r[c:c + e]
        S.sort(axis=1)
        stack.check_finite(S[:, 0])
        stack.check_finite(S[:, -1])
        yield c, S


def trimmed_mean(updates: Sequence[Vector], *, f: int = 0) -> Vector:
    """Coordinate-wise mean after dropping the f largest and f smallest values.

    Needs n >= 2f + 1 (at least one value left). With f = 0 this is the mean (summed in
    sorted order, so it may differ from `mean` in the last bit)."""
    stack = prepare(updates, "trimmed-mean")
    f = check_f("trimmed-mean", f, stack.n, min_n=(2, 1))
    n = stack.n
    k = n - 2 * f
    if stack.np is not None:
        np = stack.np
        out = np.empty(stack.d, dtype=np.float32)
        K = None
        for c, S in sorted_blocks(stack, range(n)):
            e = S.shape[0]
            if K is None:
                K = np.empty((k, e))
            kept = K[:, :e]
            np.copyto(kept, S[:, f:n - f].T)  # widened, one row per rank: ascending
            acc = np.add.reduce(kept, axis=0)  # row after row: ascending order, from +0
            acc /= k
            acc += 0.0
            out[c:c + e] = acc  # the one rounding to float32
        return out
    out_py = []
    for col in zip(*stack.rows, strict=True):
        c = sorted(col)
        s = c[f]
        for x in c[f + 1:n - f]:
            s += x
        out_py.append(s / k + 0.0)
    return stack.vector(out_py)


def mean_around_median(stack: Stack, idx: Sequence[int], beta: int) -> Any:
    """Bulyan's second stage over the rows idx: per coordinate, the mean of the beta values
    closest to the median of those rows (float64 values).

    "Closest" orders values by (|x - median|, x): an exact tie in distance keeps the smaller
    value, so the result depends only on the multiset of values. The kept values always form
    a contiguous run of the sorted column; they are summed in ascending order."""
    if stack.np is not None:
        np = stack.np
        n = len(idx)
        m = n // 2
        out = np.empty(stack.d, dtype=np.float64)
        # wider blocks than the plain sort: the window search below is ~6 numpy calls per
        # step and block
        for c, S32 in sorted_blocks(stack, idx, stack.width):
            S = S32.astype(np.float64)  # (width, n), each row sorted
            med = S[:, m] if n % 2 else (S[:, m - 1] + S[:, m]) / 2
            # The kept values are the window S[:, s:s + beta] of each sorted row. Sliding it
            # one step right swaps S[t] out for S[t + beta]; that pays exactly while S[t + beta]
            # is closer, so s counts the steps that pay.
            start = np.zeros(S.shape[0], dtype=np.intp)
            for t in range(n - beta):
                a, b = S[:, t], S[:, t + beta]
                da, db = np.abs(a - med), np.abs(b - med)
                start += (db < da) | ((db == da) & (b < a))
            cols = np.arange(S.shape[0])
            acc = S[cols, start].copy()
            for r in range(1, beta):
                acc += S[cols, start + r]
            out[c:c + S.shape[0]] = acc
        return out / beta + 0.0
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
