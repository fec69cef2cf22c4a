"""A validated stack of update vectors: the checks every rule shares, and its two backends.

`prepare` turns the caller's updates into float64 rows, once: a numpy (n, d) array when every
update is a numpy array (the native fast path), else a list of lists of Python floats (the
pure path, the only one in Pyodide). Both backends do the same IEEE double operations in the
same order wherever a rule's arithmetic allows it, which is what makes most rules give
bit-identical results on both paths (see the package docstring for which ones do).

Pure-path rule: never call the builtin `sum` on floats for a result. Python 3.12 made it
compensated, so Pyodide (3.13) and a 3.11 server would disagree; use explicit left-to-right
loops (same order as numpy's row-by-row accumulation) or `math.fsum` (correctly rounded).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from shared.vec import Vector, is_numpy, numpy_module, same_kind

# Keeps the (rows x d) float64 temporaries of the distance matrix near 32 MiB.
_CHUNK_VALUES = 1 << 22


def check_f(rule: str, f: object, n: int, *, min_n: tuple[int, int] | None = None) -> int:
    """f as an int >= 0; with min_n=(a, b), also require n >= a*f + b (the rule's bound)."""
    if isinstance(f, bool):
        raise ValueError(f"{rule}: f must be an integer, got {f!r}")
    try:
        f_int = operator.index(f)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{rule}: f must be an integer, got {f!r}") from None
    if f_int < 0:
        raise ValueError(f"{rule}: f={f_int} is negative")
    if min_n is not None:
        a, b = min_n
        need = a * f_int + b
        if n < need:
            raise ValueError(f"{rule}: f={f_int} needs n >= {a}f + {b} = {need} updates, "
                             f"got n={n}")
    return f_int


def check_int(rule: str, name: str, value: object, *, low: int, high: int | None = None) -> int:
    """A named integer parameter within [low, high]."""
    if isinstance(value, bool):
        raise ValueError(f"{rule}: {name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{rule}: {name} must be an integer, got {value!r}") from None
    if v < low or (high is not None and v > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{rule}: {name}={v} must be {bound}")
    return v


def check_positive(rule: str, name: str, value: object) -> float:
    """A named finite float parameter > 0."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{rule}: {name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{rule}: {name}={value!r} must be finite and > 0")
    return v


@dataclass(frozen=True, slots=True)
class Stack:
    """n validated, finite updates of equal length d, held as float64."""

    rule: str  # rule name, for error messages
    rows: Any  # numpy float64 (n, d) array on the fast path, else list[list[float]]
    n: int  # number of updates
    d: int  # length of every update
    np: ModuleType | None  # numpy when this stack takes the fast path, else None
    template: Vector  # the first update: results take its kind

    def vector(self, values: Any) -> Vector:
        """float64 values (array or list) -> a float32 Vector of the inputs' kind."""
        if self.np is not None:
            return self.np.asarray(values, dtype=self.np.float64).astype(self.np.float32)
        return same_kind(self.template, values)

    def row_vector(self, i: int) -> Vector:
        """A copy of update i, as a Vector of the inputs' kind."""
        return self.vector(self.rows[i])

    def mean_of(self, idx: Sequence[int]) -> Any:
        """Mean of the rows idx, summed left to right in the order given, then divided once."""
        k = len(idx)
        if self.np is not None:
            acc = self.rows[idx[0]].copy()
            for i in idx[1:]:
                acc += self.rows[i]
            return acc / k
        rows = self.rows
        out = list(rows[idx[0]])
        for i in idx[1:]:
            out = [a + b for a, b in zip(out, rows[i], strict=True)]
        return [a / k for a in out]

    def sq_distances(self) -> list[list[float]]:
        """Squared Euclidean distances between all pairs, as an n x n list (symmetric, 0 on
        the diagonal). Each entry depends only on the two vectors, not on their positions.
        numpy sums the squared differences pairwise, the pure path with math.fsum (correctly
        rounded): they agree to ~1e-15 relative, exactly when every square and partial sum is
        exact (e.g. small integer-valued updates)."""
        n = self.n
        if self.np is not None:
            np = self.np
            X = self.rows
            D = np.zeros((n, n), dtype=np.float64)
            step = max(1, _CHUNK_VALUES // max(1, self.d))
            for i in range(n - 1):
                for j0 in range(i + 1, n, step):
                    diff = X[j0:j0 + step] - X[i]
                    D[i, j0:j0 + step] = (diff * diff).sum(axis=1)
            out: list[list[float]] = (D + D.T).tolist()
            return out
        rows = self.rows
        table = [[0.0] * n for _ in range(n)]
        for i in range(n - 1):
            a = rows[i]
            for j in range(i + 1, n):
                b = rows[j]
                table[i][j] = table[j][i] = math.fsum(
                    [(x - y) * (x - y) for x, y in zip(a, b, strict=True)])
        return table

    def lex_cmp(self, i: int, j: int) -> int:
        """-1, 0 or 1 as update i is lexicographically below, equal to or above update j."""
        if self.np is not None:
            a, b = self.rows[i], self.rows[j]
            where = self.np.flatnonzero(a != b)
            if where.size == 0:
                return 0
            k = int(where[0])
            return -1 if a[k] < b[k] else 1
        x: list[float] = self.rows[i]
        y: list[float] = self.rows[j]
        return (x > y) - (x < y)

    def norms(self, center: Any) -> list[float]:
        """Euclidean distance of every row to `center` (float64 values)."""
        if self.np is not None:
            diff = self.rows - center
            out: list[float] = self.np.sqrt((diff * diff).sum(axis=1)).tolist()
            return out
        return [math.sqrt(math.fsum([(x - c) * (x - c) for x, c in zip(r, center, strict=True)]))
                for r in self.rows]

    def weighted_sum(self, weights: Sequence[float], center: Any = None) -> Any:
        """sum_i weights[i] * (row_i - center), rows added left to right (center None: 0)."""
        if self.np is not None:
            np = self.np
            acc = np.zeros(self.d, dtype=np.float64)
            for w, r in zip(weights, self.rows, strict=True):
                acc += w * (r if center is None else r - center)
            return acc
        acc_py = [0.0] * self.d
        for w, r in zip(weights, self.rows, strict=True):
            if center is None:
                acc_py = [a + w * x for a, x in zip(acc_py, r, strict=True)]
            else:
                acc_py = [a + w * (x - c) for a, x, c in zip(acc_py, r, center, strict=True)]
        return acc_py


def _not_finite(rule: str, i: int, j: int, value: float) -> ValueError:
    return ValueError(f"{rule}: update {i} is not finite ({value} at coordinate {j})")


def prepare(updates: Sequence[Vector], rule: str) -> Stack:
    """Validate a stack (non-empty, equal lengths, every value finite) and load it as float64.

    Raises ValueError naming the rule and, for a bad update, its index in the stack."""
    n = len(updates)
    if n == 0:
        raise ValueError(f"{rule}: no updates to aggregate")
    np = numpy_module()
    for i, u in enumerate(updates):
        if is_numpy(u) and u.ndim != 1:
            raise ValueError(f"{rule}: update {i} is not a flat vector (shape {u.shape})")
    d = len(updates[0])
    for i, u in enumerate(updates):
        if len(u) != d:
            raise ValueError(f"{rule}: update {i} has length {len(u)}, update 0 has length {d}")
    if np is not None and all(is_numpy(u) for u in updates):
        X = np.empty((n, d), dtype=np.float64)
        for i, u in enumerate(updates):
            X[i] = u
        ok = np.isfinite(X)
        if not ok.all():
            i = int(np.argmin(ok.all(axis=1)))
            j = int(np.argmin(ok[i]))
            raise _not_finite(rule, i, j, float(X[i, j]))
        return Stack(rule, X, n, d, np, updates[0])
    rows: list[list[float]] = []
    for i, u in enumerate(updates):
        row = [float(x) for x in (u.tolist() if is_numpy(u) else u)]
        if not math.isfinite(sum(row)):  # only a screen: locate the culprit exactly below
            for j, x in enumerate(row):
                if not math.isfinite(x):
                    raise _not_finite(rule, i, j, x)
        rows.append(row)
    return Stack(rule, rows, n, d, None, updates[0])


def check_reference(stack: Stack, reference: Vector | None, name: str = "reference") -> Any:
    """A caller-supplied vector as float64 values of the stack's backend (None: zeros)."""
    rule = stack.rule
    if reference is None:
        return stack.np.zeros(stack.d) if stack.np is not None else [0.0] * stack.d
    if is_numpy(reference) and reference.ndim != 1:
        raise ValueError(f"{rule}: {name} is not a flat vector (shape {reference.shape})")
    if len(reference) != stack.d:
        raise ValueError(f"{rule}: {name} has length {len(reference)}, updates have {stack.d}")
    values = [float(x) for x in (reference.tolist() if is_numpy(reference) else reference)]
    for j, x in enumerate(values):
        if not math.isfinite(x):
            raise ValueError(f"{rule}: {name} is not finite ({x} at coordinate {j})")
    if stack.np is not None:
        return stack.np.asarray(values, dtype=stack.np.float64)
    return values
