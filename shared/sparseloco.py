"""SparseLoCo's outer step and downlink (Sarfi et al. 2025, arXiv 2508.15706).

Run option `outer = "sparseloco"` (server.config). The nodes send top-k pseudo-gradients with
2-bit values and keep what the codec dropped (error feedback, in place of outer momentum). The
server then makes its own step sparse too, so that the downlink is as small as the uplink:

    x      = aggregate + e              (e: the server's residual; plain mode)
    x      = g + mu * m' + e,  m' = mu * m + g    (outer_params momentum > 0: Nesterov)
    u      = decode(encode_topk(x))     (fraction, values "int2", block: outer_params)
    e'     = decay * (x - u)            (decay: outer_params, 0.8 by default)
    theta' = theta - lr * u             (float32; `apply_step`)

and broadcasts only the encoded u (the RoundOpen kind "sparse", payload below). Every node
runs `apply_step` on the params it holds, the same float32 operations on the same decoded
vector, so it holds the server's bytes exactly; it checks the result against the RoundOpen's
params digest and, on a mismatch (a missed round, a bad frame), drops its params and gets the
full params on reconnect (shared.participant). The server keeps e (and m) in the outer
momentum slot of its checkpoints ([e] plain, [m, e] Nesterov), so a restarted server resumes
them.

RoundOpen payload (little-endian), with `base_digest` = the digest of theta_{r-1}:

    b"DL" | u8 3 | f64 lr | a topk codec payload (shared.codecs.topk) of n values
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from shared.codecs import TopK, decode_payload, make_codec
from shared.errors import BadUpdate
from shared.platform import sparse_stepper
from shared.vec import from_bytes, numpy_module, to_bytes

MAGIC = b"DL"
VERSION = 3
HEAD = struct.Struct("<2sBd")
FEATURE = "sparse-step"  # Hello feature: this node applies "sparse" RoundOpens

__all__ = ["FEATURE", "SparseOuter", "apply_sparse", "apply_step", "can_step",
           "decode_sparse_step", "decode_step", "is_sparse_step", "resolve_step", "server_step",
           "state_step"]


@dataclass(frozen=True, kw_only=True, slots=True)
class SparseOuter:
    """The server's sparse outer step: lr, optional Nesterov momentum, and its top-k codec."""

    lr: float = 1.0
    momentum: float = 0.0  # > 0: Nesterov on the aggregate, then compressed (DiLoCo's step)
    fraction: float = 0.04  # share of coordinates the step moves (the downlink's density)
    values: str = "int2"  # "int2", "int8" or "fp16"
    block: int = 256  # kept values per level pair / scale
    decay: float = 0.8  # the server residual's decay: e' = decay * (x - u) (1: keep it all)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"sparseloco lr must be > 0, got {self.lr!r}")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"sparseloco decay must be in [0, 1], got {self.decay!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"sparseloco momentum must be in [0, 1), got {self.momentum!r}")
        self.codec()  # TopK checks fraction, values, block

    def codec(self) -> TopK:
        c = make_codec("topk", fraction=self.fraction, values=self.values, block=self.block)
        assert isinstance(c, TopK)
        return c

    @classmethod
    def from_params(cls, lr: float, params: dict[str, Any]) -> SparseOuter:
        """From the run's outer_lr and outer_params; ValueError names a bad or unknown key."""
        known = {"momentum", "fraction", "values", "block", "decay"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"outer_params has no key(s) {unknown}; it takes {sorted(known)}")
        return cls(lr=lr, **params)


CHUNK = 1 << 22  # values per pass where the step still needs a temporary (Nesterov)


def _numpy() -> Any:
    np = numpy_module()
    if np is None:
        raise RuntimeError("the sparseloco step needs numpy")
    return np


def apply_step(theta: Any, u: Any, lr: float) -> Any:
    """theta - lr * u in float32 over every coordinate (numpy in, numpy out): the dense
    reference that `apply_sparse` reproduces bit for bit (tests/test_sparseloco_inplace.py)."""
    np = _numpy()
    t = np.asarray(theta, dtype=np.float32)
    step = (np.float32(lr) * np.asarray(u, dtype=np.float32)).astype(np.float32)
    return (t - step).astype(np.float32)


def apply_sparse(theta: Any, idx: Any, vals: Any, lr: float, *, out: Any = None) -> Any:
    """The same bits as `apply_step(theta, u, lr)` for the u that is `vals` at `idx` (int64,
    ascending) and 0 elsewhere, with no n-sized temporary: a copy of theta (or `out`, a
    writable float32 array of theta's size that already holds theta) with
    out[idx] -= f32(f32(lr) * vals). Where u is 0 the dense step is theta - (+0.0), which is
    theta exactly (-0.0, +-inf and quiet NaNs included; only a signalling NaN, which the dense
    subtraction would quiet, is kept as it is)."""
    np = _numpy()
    if out is None:
        out = np.array(theta, dtype=np.float32, copy=True)
    step = (np.float32(lr) * np.asarray(vals, dtype=np.float32)).astype(np.float32)
    out[idx] -= step
    return out


def server_step(theta: Any, grad: Any, state: Any, cfg: SparseOuter, *, out: Any = None
                ) -> tuple[Any, Any, bytes]:
    """(theta', state', RoundOpen payload) from the round's aggregate `grad`; `state` is the
    checkpointed buffer: [e] (plain) or [m, e] (Nesterov), zeros of size n at the start.
    `out`: where to build theta' (a writable float32 array holding theta), else a copy.
    `state_step` then `apply_sparse`: see there."""
    idx, vals, new_state, payload = state_step(grad, state, cfg)
    return apply_sparse(theta, idx, vals, cfg.lr, out=out), new_state, payload


def state_step(grad: Any, state: Any, cfg: SparseOuter) -> tuple[Any, Any, Any, bytes]:
    """(indices, values, state', payload): the step u (top-k of x, decoded sparse), the new
    state and the RoundOpen payload; theta' = apply_sparse(theta, indices, values, cfg.lr).

    In place: a writable float32 `state` is consumed (x is built in its e slot, then becomes
    e'; state' IS that buffer), so the step holds the state, the top-k's k-sized arrays and
    one CHUNK of temporaries beside `grad`: no n-sized temporary. The server lets go of
    `grad` before it makes theta' (server.outer_step)."""
    np = _numpy()
    g = np.asarray(grad, dtype=np.float32)
    n = g.size
    st = np.asarray(state, dtype=np.float32)
    size = 2 * n if cfg.momentum > 0 else n
    if st.size == size and st.flags.writeable and st.flags.c_contiguous:
        buf = st.reshape(-1)
    elif st.size == size:  # read-only (a checkpoint's bytes, say): a copy
        buf = np.array(st, dtype=np.float32, copy=True).reshape(-1)
    else:  # the first Nesterov step (m = 0), or a switch from Nesterov to plain
        buf = np.zeros(size, np.float32)
        buf[-n:] = st[-n:]  # [-n:]: the residual of a [m, e] state too
    x = buf[-n:]
    if cfg.momentum > 0:
        mu = np.float32(cfg.momentum)
        m = buf[:n]
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            mc = m[lo:hi]
            mc *= mu
            mc += g[lo:hi]  # m' = f32(f32(mu * m) + g)
            t = mu * mc
            t += g[lo:hi]  # g + mu * m' (addition commutes bit for bit)
            x[lo:hi] += t  # x = (g + mu * m') + e
    else:
        x += g  # x = g + e
    payload = HEAD.pack(MAGIC, VERSION, cfg.lr) + cfg.codec().encode(x)
    _, idx, vals = decode_sparse_step(payload, n)
    x[idx] -= vals  # e = x - u: where u is 0, x - (+0.0) is x exactly
    if cfg.decay != 1.0:
        x *= np.float32(cfg.decay)
    return idx, vals, buf, payload


def is_sparse_step(payload: bytes | memoryview) -> bool:
    return len(payload) > HEAD.size and bytes(payload[:3]) == MAGIC + bytes([VERSION])


def _check(payload: bytes | memoryview) -> tuple[float, memoryview]:
    if not is_sparse_step(payload):
        raise BadUpdate("not a sparse-step payload", field="payload")
    _, _, lr = HEAD.unpack_from(payload)
    if not (math.isfinite(lr) and lr > 0):
        raise BadUpdate(f"sparse step: lr {lr!r}", field="payload")
    body = memoryview(payload)[HEAD.size:]
    if body[0] != TopK.wire_id:
        raise BadUpdate("sparse step: the step is not a topk payload", field="payload")
    return lr, body


def decode_step(payload: bytes | memoryview, n: int) -> tuple[float, Any]:
    """(lr, u) from a "sparse" RoundOpen payload; BadUpdate on anything malformed."""
    lr, body = _check(payload)
    np = numpy_module()
    u = decode_payload(body, n, use_numpy=np is not None)
    if np is None:
        raise BadUpdate("sparse step: this runtime has no numpy", field="payload")
    return lr, np.asarray(u, dtype=np.float32)


def decode_sparse_step(payload: bytes | memoryview, n: int) -> tuple[float, Any, Any]:
    """(lr, indices, values) of the step u (0 off the indices); BadUpdate if malformed."""
    lr, body = _check(payload)
    if numpy_module() is None:
        raise BadUpdate("sparse step: this runtime has no numpy", field="payload")
    idx, vals = TopK.decode_sparse(body, n)
    return lr, idx, vals


def resolve_step(held: Any, payload: bytes | memoryview, *, out: Any = None) -> Any:
    """theta_r from theta_{r-1} (`held`) and a "sparse" payload (the caller checks the
    digest). `out`: a writable float32 array holding `held` to update in place instead of a
    copy (a failed decode leaves it untouched: the payload is decoded before any write).
    Without numpy (a tab) the registered stepper applies it (shared.platform: the tab's JS)."""
    stepper = sparse_stepper() if numpy_module() is None else None
    if stepper is not None:
        return from_bytes(stepper.step(to_bytes(held), bytes(payload)))
    lr, idx, vals = decode_sparse_step(payload, len(held))
    return apply_sparse(held, idx, vals, lr, out=out)


def can_step() -> bool:
    """Whether this runtime applies "sparse" RoundOpens (its Hello may say FEATURE): numpy,
    or a registered stepper (the tab's JS)."""
    return numpy_module() is not None or sparse_stepper() is not None
