"""The geometric median of spooled updates with working memory of a few column blocks.

shared.aggregation.geometric's numpy path keeps float64 vectors of the model's size: the
coordinate-wise median it starts from (v0), the point it builds at the end (a weighted sum,
then v0 added) and, on its explicit fallback, the estimate v and the next one. At 125M
parameters those are ~1 GB each. Here the same iteration runs on a `SpooledStack`
(server.spool_rules) with those vectors in float64 scratch files beside the spool
(`Scratch`, read and written one column block at a time, read from the file, never through
a mapping), so the memory is the stack's read-ahead, its float64 blocks, an n x n matrix
and the float32 result:

- v0: one pass of the stack's sorted column blocks (`sorted_blocks`, `_middle`: the median
  of a column depends on that column only, so the bits are median_values');
- the Gram matrix centered on v0 (`Stack.gram`, reading v0's slices from its file), then the
  rule's iteration in the n coefficients, unchanged;
- the point v0 + sum_j a_j (x_j - v0): per column block of the stack's width, the same
  product (`np.matmul(wv, b)` on the same block) and the same addition as
  `Stack.weighted_sum` + `_point`, cast to float32 block by block (`Stack.vector`'s cast).

So the result is the in-memory rule's bit for bit on the Gram path. On the explicit fallback
(most updates equal) each step computes the same norms (`Stack.norms`, centered on the
estimate's file), weights and weighted sum, block by block; only the length of the step,
which decides when to stop, is summed block by block where the in-memory rule sums the whole
difference at once: the two sums differ in their last bits, which changes the answer only if
a step lands within ~1e-15 relative of the stopping threshold (tests/test_spool_rules.py
compares both paths bit for bit on its cases).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from shared.aggregation._stack import Stack, check_f, check_int, check_positive
from shared.aggregation.coordinate import _middle, sorted_blocks


class Scratch:
    """A float64 vector of d values in a file, read and written by ranges of columns."""

    def __init__(self, folder: Path, d: int, prefix: str = "geomed-") -> None:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".f64", dir=folder)
        self.path, self.d = Path(name), d
        self.fh = os.fdopen(fd, "w+b")
        self.fh.truncate(8 * d)

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, _ = key.indices(self.d)
        self.fh.flush()
        return np.fromfile(self.path, dtype="<f8", count=max(0, stop - start),
                           offset=8 * start)

    def write(self, start: int, values: np.ndarray) -> None:
        self.fh.seek(8 * start)
        np.ascontiguousarray(values, dtype="<f8").tofile(self.fh)

    def close(self) -> None:
        self.fh.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def scratch_folder(stack: Stack) -> Path:
    """Where the scratch files go: beside the first spooled update (the spool), else tmp."""
    for row in stack.rows:
        name = getattr(getattr(row, "v", None), "filename", None)
        if name is not None:
            return Path(name).parent
    return Path(tempfile.gettempdir())


def geometric_median(stack: Stack, *, f: int = 0, eps: float = 1e-6, tol: float = 1e-7,
                     max_iter: int = 200) -> np.ndarray:
    """shared.aggregation.geometric_median of `stack`'s rows (see the module doc), float32."""
    assert stack.np is not None
    check_f("geometric-median", f, stack.n)
    eps = check_positive("geometric-median", "eps", eps)
    tol = check_positive("geometric-median", "tol", tol)
    max_iter = check_int("geometric-median", "max_iter", max_iter, low=1)
    folder = scratch_folder(stack)
    files: list[Scratch] = []

    def scratch() -> Scratch:
        files.append(Scratch(folder, stack.d))
        return files[-1]

    try:
        v0 = scratch()
        for c, S in sorted_blocks(stack, range(stack.n)):
            v0.write(c, _middle(np, S))
        return _weiszfeld_gram(stack, v0, eps, tol, max_iter, scratch)
    finally:
        for s in files:
            s.close()


def _weiszfeld_gram(stack: Stack, v0: Scratch, eps: float, tol: float, max_iter: int,
                    scratch: Any) -> np.ndarray:
    """shared.aggregation.geometric._weiszfeld_gram, with v0 and the point on disk."""
    n = stack.n
    G = stack.gram(center=v0)
    g = G.diagonal().copy()
    a = np.zeros(n)
    ga = np.zeros(n)
    q = 0.0
    for it in range(1, max_iter + 1):
        d2 = g - 2.0 * ga + q
        if (d2 < 1e-8 * (g + q)).any():  # cancellation: distances from v itself
            v = scratch()
            _point(stack, a, v0, v)
            return _explicit(stack, v, eps, tol, max_iter, it, scratch)
        dist = np.sqrt(d2)
        weights = 1.0 / np.maximum(eps, dist)
        new = weights / math.fsum(weights.tolist())
        delta = new - a
        step = math.sqrt(max(float(delta @ G @ delta), 0.0))
        a, ga = new, G @ new
        q = float(a @ ga)
        if step <= tol * math.fsum(dist.tolist()) / n:
            break
    return _point(stack, a, v0, None)


def _blocks(stack: Stack) -> Any:
    """(first column, the stack's float64 block of every row there) per column block."""
    B = np.empty((stack.n, stack.width), dtype=np.float64)
    for c in stack.blocks():
        yield c, stack.fill(B, c)


def _point(stack: Stack, a: np.ndarray, v0: Scratch, into: Scratch | None) -> np.ndarray:
    """v0 + sum_j a_j (x_j - v0), as Stack.weighted_sum(a, center=v0) + v0 computes it
    block by block: float32 (the result), or float64 written to `into` (then returned
    empty)."""
    wv = np.asarray(a.tolist(), dtype=np.float64)
    out = np.empty(stack.d if into is None else 0, dtype=np.float32)
    acc = np.empty(stack.width, dtype=np.float64)
    for c, b in _blocks(stack):
        e = b.shape[1]
        center = v0[c:c + e]
        b -= center
        blk = acc[:e]
        np.matmul(wv, b, out=blk)
        blk += center
        if into is None:
            out[c:c + e] = blk.astype(np.float32)
        else:
            into.write(c, blk)
    return out


def _explicit(stack: Stack, v: Scratch, eps: float, tol: float, max_iter: int, first: int,
              scratch: Any) -> np.ndarray:
    """shared.aggregation.geometric._explicit, with the estimate and the next one on disk."""
    new_file = scratch()
    acc = np.empty(stack.width, dtype=np.float64)
    for _it in range(first, max_iter + 1):
        dist = stack.norms(v)
        weights = [1.0 / max(eps, x) for x in dist]
        total = math.fsum(weights)
        wv = np.asarray(weights, dtype=np.float64)
        ss = 0.0
        for c, b in _blocks(stack):
            e = b.shape[1]
            blk = acc[:e]
            np.matmul(wv, b, out=blk)
            new = blk / total
            diff = new - v[c:c + e]
            ss += float((diff * diff).sum())
            new_file.write(c, new)
        v, new_file = new_file, v
        if math.sqrt(ss) <= tol * math.fsum(dist) / stack.n:
            break
    out = np.empty(stack.d, dtype=np.float32)
    for c in range(0, stack.d, stack.width):
        out[c:c + stack.width] = v[c:c + stack.width].astype(np.float32)
    return out
