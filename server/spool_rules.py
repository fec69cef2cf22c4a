"""Every aggregation rule over spooled updates, reading the files block by block.

server/spool.py's `blockwise` runs the coordinate-wise rules (mean, median, trimmed mean)
one block of columns at a time. The other rules need every update at once: Krum and
multi-Krum score each update by its distances to the others, Bulyan repeats Krum, the
geometric median and centered clipping iterate over distances to an estimate. Here they run
as the run's own rule code (shared.aggregation), unchanged, on a `SpooledStack`: a
`shared.aggregation._stack.Stack` whose rows are `SpooledRow`s, which hand out any range of
columns read from the update's file (server.spool.read_block: from the file, not through the
mapping, so no update's pages stay in the server's resident set). Every numpy-path routine
of a Stack reads its rows one column block at a time (`fill`, `running_sum`,
`sorted_blocks`), so:

- Krum, multi-Krum, Bulyan: the pairwise squared distances come from the centered Gram
  matrix accumulated block of columns by block (`Stack.gram`: G += B @ B.T per block);
  the selection is the rule's own, from those distances; the mean of the selected updates
  (multi-Krum) and Bulyan's trimmed step around the median run block by block.
- Geometric median (server.spool_geomed): the same Weiszfeld iteration in the n
  coefficients of the Gram matrix centered on the coordinate-wise median: one pass for the
  median, one for the Gram matrix and one for the point; where it falls back to explicit
  steps, each step is one pass for the distances to the estimate and one for the weighted
  sum. Its model-size float64 vectors (the median, the estimate) live in scratch files
  beside the spool, read by blocks: its memory is blocks and the float32 result.
- Centered clipping (server.spool_cc): per iteration, one pass for the distances to the
  estimate (by block), one for the clipped sum and the next estimate, column block by
  block; the reference is read by blocks, the estimate between steps lives in a scratch
  file beside the spool: its memory is blocks and the float32 result.

The arithmetic is the in-memory rule's, operation for operation and block for block (the
block widths are the Stack's, which depend only on n), so the results are bit-identical to
the rule on the same vectors in memory (tests/test_spool_rules.py; the geometric median's
explicit fallback: see server.spool_geomed). Memory: each row keeps one read-ahead chunk of
its file (~16 MB for all rows together, `READ_AHEAD`, whatever n and the model size), the
rule's own float64 blocks (~4 MiB), an n x n matrix and the float32 result (the geometric
median and centered clipping keep their model-size float64 vectors on disk); never an update
of the round (bench.spool_rules measures it).
One cost is the disk's, not memory's: an exact tie in Krum scores is broken by comparing the two
updates (`lex_cmp`), which reads both files up to their first difference, so identical
updates (a common attack) cost two reads of the model per comparison.

Stake or step weights: `weighted_mean`, the weighted mean in column blocks (spooled or not),
summed row after row in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from server import spool_cc, spool_geomed
from server.spool import COORDINATE_RULES, block_values, blockwise, read_block, spooled
from shared.aggregation import get_rule
from shared.aggregation._stack import Stack, _not_finite, check_shapes

READ_AHEAD = 16 * 2**20  # bytes of read-ahead chunks, all rows of a stack together


class SpooledRow:
    """One update as a row of a stack: `row[a:b]` is a float32 array of its values [a, b).
    A spooled update's are read from its file (server.spool.read_block), a read-ahead chunk
    at a time (`chunk` values: a stack's routines read rows in order, block after block);
    an update in memory is sliced where it is."""

    __slots__ = ("buf", "chunk", "d", "lo", "reads", "v")
    dtype = np.dtype(np.float32)

    def __init__(self, v: np.ndarray, chunk: int) -> None:
        self.v = v
        self.d = len(v)
        self.chunk = chunk
        self.lo = 0  # first column held in buf
        self.buf: np.ndarray | None = None  # values [lo, lo + len(buf)) of the file
        self.reads = 0  # file reads so far (the tests count them)

    @property
    def on_disk(self) -> bool:
        return isinstance(self.v, np.memmap) and getattr(self.v, "filename", None) is not None

    def __len__(self) -> int:
        return self.d

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("a spooled row is read by ranges of columns")
        start, stop, step = key.indices(self.d)
        if step != 1:
            raise ValueError("a spooled row is read by contiguous ranges")
        stop = max(start, stop)
        if not self.on_disk:
            out: np.ndarray = self.v[start:stop]
            return out
        buf = self.buf
        if buf is not None and self.lo <= start and stop <= self.lo + len(buf):
            return buf[start - self.lo:stop - self.lo]
        self.buf = None
        self.reads += 1
        if stop - start >= self.chunk:  # a range as long as the read-ahead: not kept (the
            return read_block(self.v, start, stop)  # caller copies it, e.g. mean_of's rows)
        self.lo = start
        buf = self.buf = read_block(self.v, start, min(self.d, start + self.chunk))
        buf.flags.writeable = False  # callers copy what they take (fill, sorted_blocks)
        return buf[:stop - start]

    def whole(self) -> np.ndarray:
        """Every value, in a new float32 array (read from the file, not the mapping)."""
        return read_block(self.v, 0, self.d) if self.on_disk else np.array(self.v)

    def drop(self) -> None:
        """Forget the read-ahead chunk (its memory)."""
        self.buf = None


class SpooledStack(Stack):
    """A Stack of SpooledRows: the rules' numpy path, reading rows by column blocks. The
    routines that look at whole rows are redone by blocks here (`lex_cmp`,
    `raise_not_finite`) or read the one row they return (`row_vector`)."""

    __slots__ = ()

    def row_vector(self, i: int) -> Any:
        """Update i, read from its file (Stack.vector's float32 -> float64 -> float32 is the
        identity on it: skipped, two copies of the model fewer)."""
        self.drop()
        return self.rows[i].whole()

    def _pairs(self, i: int, j: int) -> Any:
        """(first column, values of row i, values of row j) per chunk of columns."""
        a, b = self.rows[i], self.rows[j]
        step = a.chunk
        for c in range(0, self.d, step):
            yield c, a[c:c + step], b[c:c + step]

    def lex_cmp(self, i: int, j: int) -> int:
        for _c, a, b in self._pairs(i, j):
            where = np.flatnonzero(a != b)
            if where.size:
                k = int(where[0])
                return -1 if a[k] < b[k] else 1
        return 0

    def raise_not_finite(self) -> None:
        for i, row in enumerate(self.rows):
            for c in range(0, self.d, row.chunk):
                ok = np.isfinite(row[c:c + row.chunk])
                if not ok.all():
                    j = c + int(np.argmin(ok))
                    raise _not_finite(self.rule, i, j, float(row[j:j + 1][0]))
        raise ValueError(f"{self.rule}: a value overflowed")  # pragma: no cover

    def drop(self) -> None:
        for row in self.rows:
            row.drop()


def spooled_stack(rule: str, vectors: Sequence[np.ndarray],
                  chunk: int | None = None) -> SpooledStack:
    """The round's float32 vectors (spool memmaps or arrays) as a stack for `rule`; ValueError
    for an empty round or unequal lengths. `chunk`: read-ahead values per row (default
    server.spool.block_values(n, READ_AHEAD): ~16 MB for all rows together)."""
    n, d = check_shapes(vectors, rule)
    for i, v in enumerate(vectors):
        if v.dtype != np.float32:
            raise ValueError(f"{rule}: update {i} is {v.dtype}, spooled updates are float32")
    chunk = block_values(n, READ_AHEAD) if chunk is None else max(1, chunk)
    rows = [SpooledRow(v, chunk) for v in vectors]
    return SpooledStack(rule, rows, n, d, np, vectors[0])


def aggregate(rule: str, vectors: Sequence[np.ndarray], *, f: int, chunk: int | None = None,
              **params: Any) -> np.ndarray:
    """`get_rule(rule)(vectors, f=f, **params)`, reading spooled vectors from their files
    block by block (see the module doc): the same result, bit for bit. `chunk`: values per
    block (coordinate-wise rules) or per row's read-ahead (the others); default
    server.spool.block_values(n) for a block, READ_AHEAD bytes for all rows' chunks."""
    if rule in COORDINATE_RULES:
        block = block_values(len(vectors)) if chunk is None else max(1, chunk)
        return blockwise(get_rule(rule), vectors, f=f, block=block, **params)
    stack = spooled_stack(rule, vectors, chunk)
    try:
        if rule == "geometric-median":  # its model-size float64 vectors on disk
            return spool_geomed.geometric_median(stack, f=f, **params)
        if rule == "centered-clipping":  # block by block, its estimate on disk between steps
            return spool_cc.centered_clipping(stack, f=f, **params)
        return np.asarray(get_rule(rule)(stack, f=f, **params), dtype=np.float32)
    finally:
        stack.drop()


def weighted_mean(vectors: Sequence[np.ndarray], weights: Sequence[float] | np.ndarray
                  ) -> np.ndarray:
    """sum_i w_i x_i / sum_i w_i, float32: per block of columns, the rows multiplied by their
    weights in float64 and added row after row, then divided by math.fsum(weights) (each
    coordinate's result depends on its own column only, so any block size, spooled or in
    memory, gives the same bits). ValueError for weights that are not finite, negative, of
    the wrong count, or that sum to 0."""
    w = [float(x) for x in weights]
    if len(w) != len(vectors):
        raise ValueError(f"weighted mean: {len(w)} weights for {len(vectors)} updates")
    if not all(math.isfinite(x) and x >= 0 for x in w):
        raise ValueError("weighted mean: weights must be finite and >= 0")
    total = math.fsum(w)
    if total <= 0:
        raise ValueError("weighted mean: the weights sum to 0")
    n = len(vectors)
    check_shapes(vectors, "weighted mean")

    def block_mean(cols: Sequence[np.ndarray], f: int = 0) -> np.ndarray:
        acc = np.zeros(len(cols[0]), dtype=np.float64)
        tmp = np.empty_like(acc)
        for wi, col in zip(w, cols, strict=True):
            np.multiply(col, wi, out=tmp)
            acc += tmp
        acc /= total
        acc += 0.0
        return acc

    # ~32 MB of float32 columns a block (the float64 accumulator adds a quarter of it)
    return blockwise(block_mean, vectors, block=block_values(n, 32 * 2**20))


__all__ = ["SpooledRow", "SpooledStack", "aggregate", "spooled", "spooled_stack",
           "weighted_mean"]
