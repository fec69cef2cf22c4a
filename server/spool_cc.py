"""Centered clipping of spooled updates with working memory of a few column blocks.

shared.aggregation.centered_clipping's numpy path keeps two float64 vectors of the model's
size, the estimate v (from `check_reference`, which also lists a given reference as Python
floats first: ~32 bytes a value) and the clipped sum, ~1 GB each at 125M parameters. Its
iteration allows a block-wise schedule: each step needs the n distances ||x_i - v|| (one pass
over the stack), then v' = v + (1/n) sum_i s_i (x_i - v) is computed column by column from
v's own columns. So here, on a `SpooledStack` (server.spool_rules):

- the reference is checked (flat, length, finite: the rule's errors) and read by column
  blocks, widened to float64 (the rule's values: float32 -> float64 is exact), never listed;
- each step is `Stack.norms` centered on v (v's slices read from where it is), then, per
  column block of the stack's width, the same `np.matmul(wv, b)` on the same block as
  `Stack.weighted_sum`, divided by n and v's block added (elementwise, as the rule does on
  whole vectors);
- between steps v lives in a float64 scratch file beside the spool (server.spool_geomed's
  `Scratch`, read and written by blocks, gone afterwards); the last step casts each block to
  float32 into the result (`Stack.vector`'s cast). One step (the default) needs no file.

So the result is the in-memory rule's bit for bit (tests/test_spool_rules.py,
tests/test_spool_cc.py), and the memory is the stack's read-ahead, its float64 blocks and the
float32 result, whatever the model size and the number of steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from server.spool_geomed import Scratch, scratch_folder
from shared.aggregation._stack import (
    Stack,
    check_f,
    check_int,
    check_positive,
    check_reference,
)
from shared.vec import is_numpy

RULE = "centered-clipping"


class Reference:
    """A caller's reference vector, read as float64 by ranges of columns (not copied)."""

    def __init__(self, values: Any) -> None:
        self.values = values

    def __getitem__(self, key: slice) -> np.ndarray:
        return np.asarray(self.values[key], dtype=np.float64)


class Zero:
    """The zero reference (None): blocks of +0.0."""

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, _ = key.indices(1 << 62)
        return np.zeros(max(0, stop - start), dtype=np.float64)


def reference_blocks(stack: Stack, reference: Any) -> Reference | Zero:
    """`reference` checked as check_reference checks it (the same ValueErrors), by blocks of
    the stack's width when it is a numpy array; anything else goes through check_reference
    itself (a list: already Python floats)."""
    if reference is None:
        return Zero()
    if not is_numpy(reference):
        return Reference(check_reference(stack, reference))
    if reference.ndim != 1:
        raise ValueError(f"{RULE}: reference is not a flat vector (shape {reference.shape})")
    if len(reference) != stack.d:
        raise ValueError(f"{RULE}: reference has length {len(reference)}, updates have "
                         f"{stack.d}")
    ref = Reference(reference)
    w = stack.width
    for c in range(0, stack.d, w):
        block = ref[c:c + w]
        ok = np.isfinite(block)
        if not ok.all():
            j = int(np.argmin(ok))
            raise ValueError(f"{RULE}: reference is not finite ({float(block[j])} at "
                             f"coordinate {c + j})")
    return ref


def centered_clipping(stack: Stack, *, f: int = 0, tau: float = 10.0, iterations: int = 1,
                      reference: Any = None) -> np.ndarray:
    """shared.aggregation.centered_clipping of `stack`'s rows (see the module doc), float32."""
    assert stack.np is not None
    check_f(RULE, f, stack.n)
    tau = check_positive(RULE, "tau", tau)
    iterations = check_int(RULE, "iterations", iterations, low=1)
    v: Reference | Zero | Scratch = reference_blocks(stack, reference)
    at_zero = reference is None  # v = 0: x - v = x, the rule skips the subtractions
    folder = scratch_folder(stack)
    files: list[Scratch] = []
    out = np.empty(stack.d, dtype=np.float32)
    try:
        for it in range(iterations):
            last = it == iterations - 1
            norms = stack.norms(None if at_zero else v)
            scale = [tau / x if x > tau else 1.0 for x in norms]
            into: Scratch | None = None
            if not last:  # v' in a file: the one v was read from two steps ago, or a new one
                if len(files) < 2:
                    files.append(Scratch(folder, stack.d, prefix="cc-"))
                into = files[0] if files[0] is not v else files[1]
            _step(stack, scale, v, at_zero, into, out)
            if into is not None:
                v = into
            at_zero = False
        return out
    finally:
        for s in files:
            s.close()


def _step(stack: Stack, scale: list[float], v: Any, at_zero: bool, into: Scratch | None,
          out: np.ndarray) -> None:
    """v + (1/n) sum_i scale_i (x_i - v) per column block (Stack.weighted_sum's product, then
    the rule's `acc /= n; acc += v`): float64 written to `into`, else float32 into `out`."""
    n = stack.n
    wv = np.asarray(scale, dtype=np.float64)
    B = np.empty((n, stack.width), dtype=np.float64)
    acc = np.empty(stack.width, dtype=np.float64)
    for c in stack.blocks():
        b = stack.fill(B, c)
        e = b.shape[1]
        vb = v[c:c + e]
        if not at_zero:
            b -= vb
        blk = acc[:e]
        np.matmul(wv, b, out=blk)
        blk /= n
        blk += vb
        if into is None:
            out[c:c + e] = blk.astype(np.float32)
        else:
            into.write(c, blk)


__all__ = ["Reference", "Zero", "centered_clipping", "reference_blocks"]
