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
from shared.vec import numpy_module

MAGIC = b"DL"
VERSION = 3
HEAD = struct.Struct("<2sBd")
FEATURE = "sparse-step"  # Hello feature: this node applies "sparse" RoundOpens

__all__ = ["FEATURE", "SparseOuter", "apply_step", "decode_step", "is_sparse_step",
           "server_step"]


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


def apply_step(theta: Any, u: Any, lr: float) -> Any:
    """theta - lr * u in float32 (numpy in, numpy out): the one function the server and every
    node run, so that they agree bit for bit."""
    np = numpy_module()
    if np is None:
        raise RuntimeError("the sparseloco step needs numpy")
    t = np.asarray(theta, dtype=np.float32)
    step = (np.float32(lr) * np.asarray(u, dtype=np.float32)).astype(np.float32)
    return (t - step).astype(np.float32)


def server_step(theta: Any, grad: Any, state: Any, cfg: SparseOuter
                ) -> tuple[Any, Any, bytes]:
    """(theta', state', RoundOpen payload) from the round's aggregate `grad`; `state` is the
    checkpointed buffer: [e] (plain) or [m, e] (Nesterov), zeros of size n at the start."""
    np = numpy_module()
    if np is None:
        raise RuntimeError("the sparseloco step needs numpy")
    n = theta.size
    g = np.asarray(grad, dtype=np.float32)
    st = np.asarray(state, dtype=np.float32)
    if cfg.momentum > 0:
        if st.size == n:  # the run's first step (or a switch from plain mode): m = 0
            st = np.concatenate([np.zeros(n, np.float32), st])
        m = (np.float32(cfg.momentum) * st[:n] + g).astype(np.float32)
        x = (g + np.float32(cfg.momentum) * m + st[n:]).astype(np.float32)
    else:
        m = None
        x = (g + st[-n:]).astype(np.float32)  # [-n:]: the residual of a [m, e] state too
    payload = HEAD.pack(MAGIC, VERSION, cfg.lr) + cfg.codec().encode(x)
    u = decode_step(payload, n)[1]
    e = (x - u).astype(np.float32)
    if cfg.decay != 1.0:
        e *= np.float32(cfg.decay)  # in place: same float32 products, no n-sized temporary
    new_state = e if m is None else np.concatenate([m, e])
    return apply_step(theta, u, cfg.lr), new_state, payload


def is_sparse_step(payload: bytes | memoryview) -> bool:
    return len(payload) > HEAD.size and bytes(payload[:3]) == MAGIC + bytes([VERSION])


def decode_step(payload: bytes | memoryview, n: int) -> tuple[float, Any]:
    """(lr, u) from a "sparse" RoundOpen payload; BadUpdate on anything malformed."""
    if not is_sparse_step(payload):
        raise BadUpdate("not a sparse-step payload", field="payload")
    _, _, lr = HEAD.unpack_from(payload)
    if not (math.isfinite(lr) and lr > 0):
        raise BadUpdate(f"sparse step: lr {lr!r}", field="payload")
    body = memoryview(payload)[HEAD.size:]
    if body[0] != TopK.wire_id:
        raise BadUpdate("sparse step: the step is not a topk payload", field="payload")
    np = numpy_module()
    u = decode_payload(body, n, use_numpy=np is not None)
    if np is None:
        raise BadUpdate("sparse step: this runtime has no numpy", field="payload")
    return lr, np.asarray(u, dtype=np.float32)


def resolve_step(held: Any, payload: bytes | memoryview) -> Any:
    """theta_r from theta_{r-1} (`held`) and a "sparse" payload (the caller checks the
    digest)."""
    lr, u = decode_step(payload, len(held))
    return apply_step(held, u, lr)
