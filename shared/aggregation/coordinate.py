"""Coordinate-wise rules: mean, median, trimmed mean, and Bulyan's median-window mean.

Every value is computed in float64 and rounded to float32 once, at the end, except the mean
of float32 updates, which is summed in float32 (see `mean`). Sums run left to right over values
sorted ascending (or, for `mean`, in stack order) on both backends, so the pure and numpy paths
give bit-identical results. Sorting makes median and trimmed mean exactly
permutation-invariant too; a final `+ 0.0` turns -0.0 into 0.0 so that not even the sign of a
zero depends on the order of the stack.

The numpy path never widens the whole stack: it sorts one column block at a time (the median
and Bulyan transposed, so that each column is a contiguous run of n float32 values for numpy's
SIMD sort; the trimmed mean in place along the stack axis, `rank_blocks`), then sums the kept
values of the block in float64, in ascending order. `mean` reads the updates where they are,
each once, without stacking them.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from typing import Any

from shared.aggregation._stack import (
    RANK_FACTOR,
    SORT_FACTOR,
    Stack,
    block_width,
    check_f,
    check_shapes,
    prepare,
    unaliased,
)
from shared.vec import Vector, is_numpy, numpy_module


def _float32_kind(u: object, np: Any) -> bool:
    """A float32 update: a numpy float32 array or an array('f')."""
    if isinstance(u, array):
        return u.typecode == "f"
    return np is not None and is_numpy(u) and getattr(u, "dtype", None) == np.float32


def mean(updates: Sequence[Vector], *, f: int = 0) -> Vector:
    """Coordinate-wise arithmetic mean. Not robust: one update can move it anywhere.

    f is accepted and ignored. Float32 updates (numpy float32 or array('f')) are summed in
    float32, row after row in stack order, then divided by n (what byzfl's and Flower's
    means do; an error of at most (n - 1) float32 roundings of the running sum): one pass
    over the stack at memory speed. A coordinate whose float32 sum overflows (finite values,
    a sum that is not) is summed in float64 instead, so each coordinate's result depends only
    on its own column (column blocks and p2p shards give the same bits as the whole vector).
    Other updates are summed in float64. Both
    paths do the same IEEE operations in the same order (Python's float64 add and divide of
    float32 values, rounded to float32, is the float32 operation: 53 >= 2 * 24 + 2), so the
    pure and numpy paths agree exactly; a permuted stack may differ in the last bits."""
    np = numpy_module()
    if np is not None and all(is_numpy(u) and u.dtype == np.float32 for u in updates):
        n = check_shapes(updates, "mean")[0]
        check_f("mean", f, n)
        with np.errstate(all="ignore"):  # a NaN, inf or overflow: handled below
            out = np.add(updates[0], updates[1]) if n > 1 else updates[0] + np.float32(0.0)
            for r in updates[2:]:
                out += r  # each row is read once, into a float32 accumulator (in L3)
            out /= np.float32(n)
            out += np.float32(0.0)  # -0.0 -> 0.0, as a sum that starts at +0
            # the sum of the result is finite unless a value is not (or, rarely, that sum
            # overflows: then every value is looked at)
            ok = np.isfinite(np.add.reduce(out)) or np.isfinite(out).all()
        if not ok:  # a non-finite update (named by prepare's check) or an overflowed sum
            idx = np.flatnonzero(~np.isfinite(out))
            cols = np.stack([r[idx] for r in updates]).astype(np.float64)
            if not np.isfinite(cols).all():
                prepare(updates, "mean").raise_not_finite()
            acc = np.add.reduce(cols, axis=0)  # row after row, in float64
            acc /= n
            out[idx] = acc + 0.0
        return out
    stack = prepare(updates, "mean")
    check_f("mean", f, stack.n)
    if all(_float32_kind(u, np) for u in updates):
        rows = stack.rows
        acc = array("f", [0.0 + x for x in rows[0]])  # as numpy: no -0.0 sum
        for r in rows[1:]:
            acc = array("f", [a + b for a, b in zip(acc, r, strict=True)])  # float32 sum
        k = stack.n
        res = array("f", [a / k + 0.0 for a in acc])
        for j, x in enumerate(res):
            if not math.isfinite(x):  # the float32 sum overflowed: this column in float64
                s = 0.0 + rows[0][j]
                for r in rows[1:]:
                    s += r[j]
                res[j] = s / k + 0.0
        return stack.vector(res)
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


def rank_blocks(stack: Stack) -> Any:
    """Numpy path: (first column, B) per column block, B[r] = the values of rank r (ascending)
    of the block's columns over all rows (an (n, width) array of the stack's dtype; one
    buffer, refilled for the next block). Each row's slice is copied into its row of B
    (contiguous copies, no transposition), then B is sorted in place along axis 0 (numpy
    sorts each column through a contiguous buffer; `unaliased` keeps the columns' values
    off one cache set). Checks finiteness on the way (NaN sorts last, inf first or last)."""
    np = stack.np
    assert np is not None
    rows = stack.rows
    w = unaliased(block_width(stack.n, RANK_FACTOR))
    buf = np.empty((stack.n, w), dtype=rows[0].dtype)
    for c in range(0, stack.d, w):
        e = min(stack.d, c + w) - c
        B = buf[:, :e]
        for j, r in enumerate(rows):
            B[j] = r[c:c + e]
        B.sort(axis=0)
        stack.check_finite(B[0])
        stack.check_finite(B[-1])
        yield c, B


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
        for c, B in rank_blocks(stack):
            e = B.shape[1]
            if K is None:
                K = np.empty((k, e))
            kept = K[:, :e]
            np.copyto(kept, B[f:n - f])  # widened, one row per rank: ascending
            acc = np.add.reduce(kept, axis=0)  # row after row: ascending order
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
        out /= beta  # in place: one float64 vector of the model's size, not three
        out += 0.0
        return out
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
