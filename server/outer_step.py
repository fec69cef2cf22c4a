"""The server's outer step, by the run's `outer` option: DiLoCo's Nesterov SGD
(shared.outer) or SparseLoCo's sparse 2-bit step (shared.sparseloco), which also returns the
RoundOpen payload that takes a node holding the previous params to the new ones.

SparseLoCo's step keeps at most three n-sized arrays at once: theta, the state it updates in
place (shared.sparseloco.state_step) and theta'. For that, the caller may hand the aggregate
over in a one-element list, which commit_step empties and lets go of before it makes theta'
(the coordinator does, unless autotune reads the aggregate after the commit). theta' is built
in the buffer of an io.BytesIO holding a copy of theta, and handed back as a read-only array
over the bytes object `getvalue` returns: once the writable view is released, CPython's
BytesIO gives its own buffer as that bytes object, not a copy. RunState keeps those bytes as
the params RoundOpen sends (`_share_params`), so the commit makes no other copy of theta'
(bench.scale_server)."""

from __future__ import annotations

import io

import numpy as np

from ml import memory
from server.config import RunConfig
from shared.outer import OuterConfig, outer_step
from shared.sparseloco import SparseOuter, apply_sparse, state_step

TRIM_ABOVE = 1 << 24  # params: above this, the step's freed heap is trimmed (ml/memory.py)


def commit_step(config: RunConfig, params: np.ndarray,
                aggregate: np.ndarray | list[np.ndarray], momentum: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, bytes | None]:
    """(new params, new momentum slot, sparse RoundOpen payload or None). `aggregate`: the
    round's aggregate, or a list holding it only, which is emptied (the step then holds the
    last reference, and drops it as soon as it can). SparseLoCo updates `momentum` in place
    when it is a writable float32 array: it is consumed."""
    grad = aggregate.pop() if isinstance(aggregate, list) else aggregate
    if config.outer == "sparseloco":
        cfg = SparseOuter.from_params(config.outer_lr, config.outer_params)
        idx, vals, state, payload = state_step(grad, momentum, cfg)
        del grad  # the aggregate is gone (if the caller handed it over) before theta' exists
        if params.size >= TRIM_ABOVE:  # and so is the encode's freed heap (~0.3 GB at 125M:
            memory.trim()  # bench.scale's server peaked at the copy below without this)
        buf = io.BytesIO(np.ascontiguousarray(params, "<f4").data.cast("B"))  # theta's copy
        view = buf.getbuffer()
        out = np.frombuffer(view, "<f4")
        apply_sparse(params, idx, vals, cfg.lr, out=out)
        del out, idx, vals
        view.release()
        theta = np.frombuffer(buf.getvalue(), "<f4")
        if theta.size >= TRIM_ABOVE:  # the step's k-sized arrays, before the eval
            memory.trim()
        return theta, state, payload
    outer = OuterConfig(lr=config.outer_lr, momentum=config.outer_momentum)
    theta, m = outer_step(params, grad, momentum, outer)
    return np.asarray(theta, np.float32), np.asarray(m, np.float32), None
