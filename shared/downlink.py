"""Compressed RoundOpen payloads: the new global params as the coordinates that changed.

A node that already holds theta_{r-1} does not need all of theta_r: with sparse updates and
no outer momentum (the top-k configuration) only a few percent of the coordinates move per
round. The server then sends

| offset | size    | field                                                     |
|--------|---------|-----------------------------------------------------------|
| 0      | 2       | magic b"DL"                                               |
| 2      | 1       | version (1)                                               |
| 3      | 4       | n, the parameter count, u32 LE                            |
| 7      | 4       | k, the number of changed coordinates, u32 LE (k <= n)     |
| 11     | 4k      | their new values, float32 LE                              |
| 11+4k  | ...     | their indices: gaps as LEB128 varints, the first from 0   |

with `RoundOpen.base_digest` = the digest of theta_{r-1}. The node copies theta_{r-1}, assigns
the k values (assignment, not addition: exact in float32) and checks the result's SHA-256
against `RoundOpen.params_digest`. A node that does not hold the base gets the full params
(the server tracks what each connection holds; a mismatch makes the node reconnect).
`encode_changes` returns None when sending the full vector is as small (k > n / 2).
"""

from __future__ import annotations

import struct
from array import array
from typing import Any

from shared.codecs import varint
from shared.errors import BadUpdate
from shared.messages import sha256_hex
from shared.outer import OuterConfig, outer_step
from shared.sparseloco import is_sparse_step, resolve_step
from shared.vec import byte_view, from_bytes, numpy_module

MAGIC = b"DL"
VERSION = 1
HEAD = struct.Struct("<2sBII")
CMP_BLOCK = 1 << 22  # values compared per pass in encode_changes

__all__ = ["apply_changes", "encode_changes", "resolve"]


def encode_changes(prev: Any, new: Any) -> bytes | None:
    """The changed coordinates of `new` against `prev` (numpy float32), or None when the full
    vector would be no larger."""
    np = numpy_module()
    if np is None:
        raise RuntimeError("encode_changes needs numpy (it runs on the server)")
    a = np.ascontiguousarray(prev, dtype=np.float32)
    b = np.ascontiguousarray(new, dtype=np.float32)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    # compare bit patterns: -0.0 vs 0.0 and NaN payloads count as changes (exact round trip),
    # a block at a time (a whole-vector mask was 123 MB at the server's 125M commit)
    ua, ub = a.view(np.uint32), b.view(np.uint32)
    found = [np.flatnonzero(ua[lo:lo + CMP_BLOCK] != ub[lo:lo + CMP_BLOCK]) + lo
             for lo in range(0, a.size, CMP_BLOCK)]
    idx = np.concatenate(found) if found else np.zeros(0, np.int64)
    del found
    n, k = a.size, idx.size
    if k * 2 > n:
        return None
    gaps = np.diff(idx, prepend=0)
    return b"".join((HEAD.pack(MAGIC, VERSION, n, k), b[idx].astype("<f4").tobytes(),
                     varint.encode_np(np, gaps)))


def apply_changes(prev: Any, payload: bytes | memoryview) -> Any:
    """theta_{r-1} + the changes in `payload` -> theta_r (numpy array in, numpy out; or
    array("f") in, array("f") out). Raises BadUpdate on any malformed payload."""
    data = memoryview(payload).cast("B")
    if len(data) < HEAD.size:
        raise BadUpdate("params delta: shorter than its header", field="payload")
    magic, version, n, k = HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise BadUpdate(f"params delta: bad magic or version {version}", field="payload")
    if n != len(prev):
        raise BadUpdate(f"params delta for {n} values; this node holds {len(prev)}",
                        field="payload")
    if k > n or len(data) < HEAD.size + 4 * k:
        raise BadUpdate(f"params delta: {k} changes do not fit", field="payload")
    vals = data[HEAD.size:HEAD.size + 4 * k]
    ibytes = data[HEAD.size + 4 * k:]
    if not k <= len(ibytes) <= varint.MAX_BYTES * k:
        raise BadUpdate(f"params delta: {len(ibytes)} index bytes for {k} changes",
                        field="payload")
    np = numpy_module()
    try:
        if np is not None and isinstance(prev, np.ndarray):
            gaps = varint.decode_np(np, ibytes, k)
            if k > 1 and int(gaps[1:].min()) == 0:
                raise BadUpdate("params delta: indices do not increase", field="payload")
            idx = np.cumsum(gaps)
            if k and int(idx[-1]) >= n:
                raise BadUpdate("params delta: index out of range", field="payload")
            out = np.array(prev, dtype=np.float32, copy=True)
            out[idx] = np.frombuffer(vals, dtype="<f4")
            return out
        gl = varint.decode_pure(ibytes, k)
    except BadUpdate:
        raise
    except Exception as exc:  # the varint decoders raise their own typed errors
        raise BadUpdate(f"params delta: {exc}", field="payload") from None
    res = array("f", prev)
    values = struct.unpack(f"<{k}f", vals)
    pos = 0
    for j, gap in enumerate(gl):
        if j and gap == 0:
            raise BadUpdate("params delta: indices do not increase", field="payload")
        pos += gap
        if pos >= n:
            raise BadUpdate("params delta: index out of range", field="payload")
        res[pos] = values[j]
    return res


def resolve(msg: Any, held: Any, held_digest: str | None) -> Any:
    """theta_r from a RoundOpen: its full payload, or `held` (theta_{r-1}, whose digest is
    `held_digest`) plus its changes or the sparse step to apply (shared.sparseloco). The
    result's digest is checked; BadUpdate otherwise (the caller then reconnects to get the
    full params)."""
    if msg.base_digest is None:
        if getattr(msg, "with_momentum", False):  # p2p: params, then the outer momentum
            return from_bytes(msg.payload[:len(msg.payload) // 2])
        return from_bytes(msg.payload)
    if held is None or held_digest != msg.base_digest:
        raise BadUpdate(f"params delta against {msg.base_digest[:12]}, but this node holds "
                        f"{(held_digest or 'nothing')[:12]}", field="base_digest")
    if is_sparse_step(msg.payload):  # SparseLoCo: apply the server's sparse step
        theta = resolve_step(held, msg.payload)
    else:
        theta = apply_changes(held, msg.payload)
    if sha256_hex(byte_view(theta)) != msg.params_digest:
        raise BadUpdate("params delta does not reproduce params_digest", field="params_digest")
    return theta


# -- p2p: "apply the outer step yourself" ------------------------------------------------------
# In a `p2p` run every member of round r ends the round holding its aggregate. The server's
# RoundOpen for round r+1 then carries, instead of theta_{r+1} or its changes, only the outer
# step to apply: magic b"DL", version 2, lr and momentum (float64 LE) and nesterov (u8). The node
# computes theta_{r+1}, m_{r+1} = outer_step(theta_r, aggregate_r, m_r) (shared.outer, the code
# the server runs) and checks the digest like any RoundOpen.
OUTER_VERSION = 2
OUTER = struct.Struct("<2sBddB")


def encode_outer_step(lr: float, momentum: float, nesterov: bool = True) -> bytes:
    return OUTER.pack(MAGIC, OUTER_VERSION, lr, momentum, int(nesterov))


def is_outer_step(payload: bytes | memoryview) -> bool:
    return len(payload) == OUTER.size and bytes(payload[:3]) == MAGIC + bytes([OUTER_VERSION])


def apply_outer_step(theta: Any, momentum: Any, aggregate: Any, payload: bytes,
                     params_digest: str) -> tuple[Any, Any]:
    """(theta_{r+1}, m_{r+1}) from what the node holds; BadUpdate if the result is not the
    server's (a different aggregate, momentum or params)."""
    if not is_outer_step(payload):
        raise BadUpdate("not an outer-step payload", field="payload")
    _, _, lr, mu, nesterov = OUTER.unpack(payload)
    if momentum is None or aggregate is None or theta is None:
        raise BadUpdate("outer step: this node lacks the params, momentum or aggregate",
                        field="payload")
    new, m = outer_step(theta, aggregate, momentum,
                        OuterConfig(lr=lr, momentum=mu, nesterov=bool(nesterov)))
    if sha256_hex(byte_view(new)) != params_digest:
        raise BadUpdate("outer step: result does not match the params digest",
                        field="params_digest")
    return new, m
