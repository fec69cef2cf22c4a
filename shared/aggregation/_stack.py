"""A validated stack of update vectors: the checks every rule shares, and its two backends.

`prepare` loads the caller's updates once: on the numpy path (every update a numpy array)
float32 updates are kept where they are, as a list (no copy of the stack is ever made; other
dtypes are stacked as float64), else a list of lists of Python floats (the pure path, the only
one in Pyodide). The numpy path works through column blocks (`blocks`) widened to float64 one
block at a time, so every sum is still a float64 sum. Both backends do the same IEEE double
operations in the same order wherever a rule's arithmetic allows it, which is what makes most
rules give bit-identical results on both paths (see the package docstring for which ones do).

Finiteness on the numpy path is checked by the rules themselves, on values they compute anyway
(`Stack.check_finite`): a float64 sum, Gram entry or norm of finite float32 values cannot
overflow, and a NaN or inf in any input makes it non-finite; only then is the stack scanned to
name the first bad update and coordinate.

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

# Values per float64 column block on the numpy path (4 MiB: blocks stay in the L2/L3 caches),
# and the fewest columns a block has (tests shrink both to run many blocks on small stacks).
_BLOCK_VALUES = 1 << 19
_MIN_WIDTH = 256
# Rules that stream rows through one or two float64 rows of a block (the mean) use blocks of
# block_width(1, MEAN_FACTOR) columns, whatever n (128k columns: 1 MiB per row, in L2/L3).
MEAN_FACTOR = 0.25
# Sorting rules fill a (columns, n) float32 block column by column (strided stores): a
# quarter block (2,048 columns at n = 64, 512 KiB) keeps those stores in L2.
SORT_FACTOR = 0.25


# Rules that sort each column block in place along the stack axis (the trimmed mean) fill an
# (n, columns) float32 block row by row: half a block (4,088 columns at n = 64, 1 MiB).
RANK_FACTOR = 0.5


def unaliased(width: int) -> int:
    """`width` less 8 columns when a row of it would span a whole number of 4 KiB pages:
    a column of a block whose rows are 4 KiB apart maps every value to the same L1 cache
    set, which made sorting (64, 4096) blocks along axis 0 four times slower."""
    return width - 8 if width > 8 and (width * 4) % 4096 == 0 else width


def block_width(n: int, factor: float = 1.0) -> int:
    """Columns per block on the numpy path for a stack of n updates (`factor` times the
    default block: row-streaming rules keep only a block of one or two rows in cache)."""
    return max(_MIN_WIDTH, int(_BLOCK_VALUES * factor) // max(1, n))


def running_sum(np: ModuleType, rows: Sequence[Any], start: int, width: int, acc: Any,
                tmp: Any) -> Any:
    """Numpy path: acc[:e] = 0.0 + rows[0][start:start+e] + rows[1][...] + ..., summed left
    to right in float64 (acc, tmp: float64 scratch of `width`; e = the columns left). Each
    float32 slice is widened into tmp (in cache) and added: no float64 copy of the stack,
    and the order and roundings of a plain Python loop. Returns acc[:e]."""
    e = min(len(rows[0]), start + width) - start
    a, t = acc[:e], tmp[:e]
    np.copyto(a, rows[0][start:start + e])
    a += 0.0  # -0.0 -> 0.0: a numpy reduce starts at +0, so does the pure path
    for r in rows[1:]:
        np.copyto(t, r[start:start + e])
        a += t
    return a


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
    rows: Any  # numpy path: the callers' float32 arrays (a list, never copied), or an (n, d)
    # float64 array for other dtypes; else list[list[float]]
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

    def blocks(self) -> range:
        """Start columns of the numpy path's column blocks (`self.width` columns each)."""
        return range(0, self.d, self.width)

    @property
    def width(self) -> int:
        return block_width(self.n)

    def check_finite(self, values: Any) -> None:
        """Numpy path: `values` were computed from every row (a float64 sum, Gram matrix or
        norms); when one is not finite, find and name the first non-finite input."""
        np = self.np
        assert np is not None
        if not np.isfinite(values).all():
            self.raise_not_finite()

    def raise_not_finite(self) -> None:
        """Numpy path: raise the ValueError that names the first non-finite input."""
        np = self.np
        assert np is not None
        X = self.rows
        for i in range(self.n):
            ok = np.isfinite(X[i])
            if not ok.all():
                j = int(np.argmin(ok))
                raise _not_finite(self.rule, i, j, float(X[i][j]))
        raise ValueError(f"{self.rule}: a value overflowed")  # pragma: no cover

    def fill(self, B: Any, c: int) -> Any:
        """Numpy path: columns c.. of every row, widened into B (n x width float64); returns
        the filled part of B. Rows are a stacked array or a list of the callers' arrays."""
        e = min(self.d, c + self.width) - c
        b = B[:, :e]
        X = self.rows
        if isinstance(X, list):
            for i, r in enumerate(X):
                b[i] = r[c:c + e]
        else:
            b[...] = X[:, c:c + e]
        return b

    def mean_of(self, idx: Sequence[int]) -> Any:
        """Mean of the rows idx, summed left to right in the order given, then divided once."""
        k = len(idx)
        if self.np is not None:
            np = self.np
            out = np.empty(self.d, dtype=np.float64)
            rows = [self.rows[i] for i in idx]
            w = block_width(1, MEAN_FACTOR)
            acc, tmp = np.empty(w), np.empty(w)
            with np.errstate(all="ignore"):  # a NaN or inf input: reported below
                for c in range(0, self.d, w):
                    a = running_sum(np, rows, c, w, acc, tmp)
                    a /= k
                    out[c:c + len(a)] = a
            self.check_finite(out)
            return out
        rows_py = self.rows
        acc = [0.0 + x for x in rows_py[idx[0]]]  # as numpy: no -0.0 sum
        for i in idx[1:]:
            acc = [a + b for a, b in zip(acc, rows_py[i], strict=True)]
        return [a / k for a in acc]

    def gram(self, center: Any = None, extra: Any = None) -> Any:
        """Numpy path: G[i, j] = (row_i - c) . (row_j - c) in float64, c = `center` (float64
        values) or, when None, the per-coordinate midrange (max + min) / 2 of the rows, which
        depends only on the multiset of rows. Centering keeps the cancellation in
        ||a||^2 + ||b||^2 - 2ab at the scale of the spread of the rows, not of their norms."""
        np = self.np
        assert np is not None
        n, w = self.n, self.width
        G = np.zeros((n, n), dtype=np.float64)
        B = np.empty((n, w), dtype=np.float64)
        with np.errstate(all="ignore"):  # a NaN or inf input: reported by check_finite
            for c in self.blocks():
                b = self.fill(B, c)
                e = b.shape[1]
                if center is None:
                    mid = np.add(b.min(axis=0), b.max(axis=0))
                    mid *= 0.5
                    b -= mid
                else:
                    b -= center[c:c + e]
                G += b @ b.T  # one BLAS product per block (syrk: symmetric by construction)
        self.check_finite(G.diagonal())
        return G

    def sq_distances(self) -> list[list[float]]:
        """Squared Euclidean distances between all pairs, as an n x n list (symmetric, 0 on
        the diagonal). The pure path sums the squared differences with math.fsum (correctly
        rounded); numpy takes them from one centered Gram product (`gram`), ||a||^2 + ||b||^2
        - 2ab, an error of ~1e-16 times the squared spread of the stack. They agree to ~1e-15
        relative to the largest distance, exactly when every product and partial sum is exact
        (e.g. small integer-valued updates); identical updates are at distance 0 on both."""
        n = self.n
        if self.np is not None:
            np = self.np
            G = self.gram()
            g = G.diagonal()
            D = np.triu(g[:, None] + g[None, :] - 2.0 * G, 1)
            np.maximum(D, 0.0, out=D)
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

    def norms(self, center: Any = None) -> list[float]:
        """Euclidean distance of every row to `center` (float64 values; None: the origin,
        which saves the numpy path a subtraction pass)."""
        if center is None and self.np is None:
            center = [0.0] * self.d
        if self.np is not None:
            np = self.np
            acc = np.zeros(self.n, dtype=np.float64)
            w = self.width
            B = np.empty((self.n, w), dtype=np.float64)
            with np.errstate(all="ignore"):  # a NaN or inf input: reported below
                for c in self.blocks():
                    b = self.fill(B, c)
                    if center is not None:
                        b -= center[c:c + b.shape[1]]
                    acc += np.einsum("ij,ij->i", b, b)
            self.check_finite(acc)
            out: list[float] = np.sqrt(acc).tolist()
            return out
        return [math.sqrt(math.fsum([(x - c) * (x - c) for x, c in zip(r, center, strict=True)]))
                for r in self.rows]

    def weighted_sum(self, weights: Sequence[float], center: Any = None) -> Any:
        """sum_i weights[i] * (row_i - center) (center None: 0). The pure path adds the rows
        left to right; numpy takes one float64 product per column block."""
        if self.np is not None:
            np = self.np
            wv = np.asarray(weights, dtype=np.float64)
            out = np.empty(self.d, dtype=np.float64)
            w = self.width
            B = np.empty((self.n, w), dtype=np.float64)
            for c in self.blocks():
                b = self.fill(B, c)
                e = b.shape[1]
                if center is not None:
                    b -= center[c:c + e]
                np.matmul(wv, b, out=out[c:c + e])
            return out
        acc_py = [0.0] * self.d
        for w_i, r in zip(weights, self.rows, strict=True):
            if center is None:
                acc_py = [a + w_i * x for a, x in zip(acc_py, r, strict=True)]
            else:
                acc_py = [a + w_i * (x - c) for a, x, c in zip(acc_py, r, center, strict=True)]
        return acc_py


def _not_finite(rule: str, i: int, j: int, value: float) -> ValueError:
    return ValueError(f"{rule}: update {i} is not finite ({value} at coordinate {j})")


def check_shapes(updates: Sequence[Vector], rule: str) -> tuple[int, int]:
    """(n, d) of a non-empty stack of flat vectors of equal length; ValueError otherwise."""
    n = len(updates)
    if n == 0:
        raise ValueError(f"{rule}: no updates to aggregate")
    for i, u in enumerate(updates):
        if is_numpy(u) and u.ndim != 1:
            raise ValueError(f"{rule}: update {i} is not a flat vector (shape {u.shape})")
    d = len(updates[0])
    for i, u in enumerate(updates):
        if len(u) != d:
            raise ValueError(f"{rule}: update {i} has length {len(u)}, update 0 has length {d}")
    return n, d


def prepare(updates: Sequence[Vector], rule: str) -> Stack:
    """Validate a stack (non-empty, equal lengths, every value finite) and load it.

    Raises ValueError naming the rule and, for a bad update, its index in the stack. On the
    numpy path the rule checks finiteness on values it computes (Stack.check_finite).
    Float32 numpy updates are read where they are, never copied into one array: every rule
    reads them one column block at a time (`fill`, `running_sum`, `sorted_blocks`).
    A Stack given as `updates` is used as it is (server.spool_rules: rows read from disk)."""
    if isinstance(updates, Stack):
        return updates
    n, d = check_shapes(updates, rule)
    np = numpy_module()
    if np is not None and all(is_numpy(u) for u in updates):
        # float32 updates stay where they are (every rule widens one column block at a
        # time); any other dtype is loaded as float64. Finiteness: see Stack.check_finite.
        f32 = all(u.dtype == np.float32 for u in updates)
        if f32:  # every rule reads column blocks of the callers' arrays (Stack.fill)
            return Stack(rule, list(updates), n, d, np, updates[0])
        X = np.empty((n, d), dtype=np.float64)
        for i, u in enumerate(updates):
            X[i] = u
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
