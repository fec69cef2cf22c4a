"""PowerSGD: low-rank factors per matrix, one power iteration with a warm-started Q.

Per tensor of the layout (in order): a tensor with >= 2 dims is viewed as the matrix
M [m, n] = [shape[0], prod(shape[1:])]; when the factors are smaller than the matrix,
r (m + n) < m n (which implies min(m, n) > r), it is sent as P [m, r] and Q [n, r]
(float32, row-major), else (1-D tensors, small matrices) as raw float32. So a payload is
never larger than raw32's.

Encode (numpy only): P = M Q_prev; P = orthonormalize(P) (QR, float64); Q = M^T P;
the receiver rebuilds M ~ P Q^T. Q_prev is the caller's state (`encode_with_state`): the Q
of the previous round for warm starting, or a seeded Gaussian for a tensor seen first.
Plain `encode` is the stateless special case (every Q freshly seeded).

Decode (both paths, byte-identical): M[i, j] = f32(((P[i,0] Q[j,0] + P[i,1] Q[j,1]) + ...)
+ P[i,r-1] Q[j,r-1]), the products and the left-to-right sum in float64. Only ENCODE has no
pure-Python path (matrix products and QR); encoders on different BLAS builds may produce
payloads that differ in the last bits, which is harmless: the payload carries P and Q.

Payload (little-endian):

    u8 6 | u8 0 (reserved) | u16 rank
    | per tensor in layout order: f32 P[m * r] then f32 Q[n * r]   (low-rank tensors)
                                  f32 values[length]                (the others)

The decoder needs the same layout (the model's manifest); its total size must equal the
payload's exactly.
"""

from __future__ import annotations

import struct
import zlib
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

from shared.codecs.base import (
    CodecBase,
    Layout,
    Reader,
    as_f32_numpy,
    bad,
    build,
    f32_array,
    le_array,
    refuse_non_finite,
)
from shared.errors import BadUpdate
from shared.vec import Vector, numpy_module

Plan = list[tuple[str, int, int, int, int]]  # (name, offset, length, m, n); m = n = 0: raw


def plan(layout: Layout, length: int, rank: int, *,
         error: Callable[[str], Exception]) -> Plan:
    """Check `layout` against `length` and decide which tensors go low-rank."""
    if layout is None:
        raise error("powersgd needs the parameter layout (layout=...)")
    out: Plan = []
    offset = 0
    for slot in layout:
        size = 1
        for d in slot.shape:
            size *= d
        if slot.offset != offset or slot.length != size or any(d < 0 for d in slot.shape):
            raise error(f"layout entry {slot.name!r} is not contiguous or mis-sized")
        m, n = (slot.shape[0], size // slot.shape[0]) if len(slot.shape) >= 2 and size else (0, 0)
        low_rank = rank * (m + n) < m * n  # smaller than raw (implies min(m, n) > rank)
        out.append((slot.name, offset, size, *((m, n) if low_rank else (0, 0))))
        offset += size
    if offset != length:
        raise error(f"layout covers {offset} values, the vector has {length}")
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class PowerSGD(CodecBase):
    """Rank-`rank` factors of every large matrix; needs `layout` to encode and decode."""

    name: ClassVar[str] = "powersgd"
    wire_id: ClassVar[int] = 6
    needs_layout: ClassVar[bool] = True
    rank: int = 4  # factor rank r
    seed: int = 0  # seeds the first Q of each tensor (not on the wire)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not (
                1 <= self.rank <= 0xFFFF):
            raise ValueError(f"rank must be an int in [1, 65535], got {self.rank!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")

    def max_encoded_size(self, length: int, *, layout: Layout = None) -> int:
        if layout is None:  # no layout: the worst case is every tensor raw
            return 4 + 4 * length
        return 4 + sum(4 * self.rank * (m + n) if m else 4 * size
                       for _, _, size, m, n in plan(layout, length, self.rank, error=ValueError))

    @property
    def estimated_ratio(self) -> float:
        """For square 1000 x 1000 matrices (the ratio depends on the layout)."""
        return 2 * self.rank * 1000 / 1_000_000

    def _params(self) -> bytes:
        return struct.pack("<BH", 0, self.rank)

    @classmethod
    def _read_params(cls, r: Reader) -> Any:
        zero, rank = r.unpack("<BH", "header")
        if zero:
            raise bad(f"powersgd header: reserved byte {zero}")
        return build(cls, rank=rank)

    # -- encode (numpy) ----------------------------------------------------------------------
    def initial_q(self, name: str, n: int) -> Any:
        """The seeded starting Q [n, rank] of tensor `name`."""
        np = numpy_module()
        assert np is not None
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        return rng.standard_normal((n, self.rank)).astype(np.float32)

    def encode_with_state(self, values: Vector, *, layout: Layout,
                          state: Mapping[str, Any | None] | None = None
                          ) -> tuple[bytes, dict[str, Any]]:
        """(payload, new state): state maps tensor name -> Q [n, rank] (None: seeded)."""
        np = numpy_module()
        if np is None:
            raise ValueError("powersgd encoding needs numpy")
        x = as_f32_numpy(np, values)
        refuse_non_finite(bool(np.isfinite(x).all()), self.name)
        r = self.rank
        parts = [bytes((self.wire_id,)), self._params()]
        new_state: dict[str, Any] = {}
        for name, off, size, m, n in plan(layout, x.size, r, error=ValueError):
            seg = x[off:off + size]
            if not m:
                parts.append(seg.astype("<f4").tobytes())
                continue
            mat = seg.reshape(m, n)
            q_prev = (state or {}).get(name)
            if q_prev is None:
                q_prev = self.initial_q(name, n)
            q_prev = np.asarray(q_prev, dtype=np.float32)
            if q_prev.shape != (n, r):
                raise ValueError(f"state for {name!r} has shape {q_prev.shape}, "
                                 f"expected {(n, r)}")
            p = np.linalg.qr((mat @ q_prev).astype(np.float64))[0].astype(np.float32)
            q = mat.T @ p
            refuse_non_finite(bool(np.isfinite(p).all() and np.isfinite(q).all()), self.name)
            parts += [p.astype("<f4").tobytes(), q.astype("<f4").tobytes()]
            new_state[name] = q
        return b"".join(parts), new_state

    def encode(self, values: Vector, *, layout: Layout = None,
               use_numpy: bool | None = None) -> bytes:
        """Stateless encode (fresh seeded Q each call); needs numpy and `layout`."""
        if use_numpy is False:
            raise ValueError("powersgd encoding has no pure-Python path")
        return self.encode_with_state(values, layout=layout)[0]

    # -- decode ------------------------------------------------------------------------------
    def _body(self, r: Reader, length: int, layout: Layout) -> Plan:
        p = plan(layout, length, self.rank, error=_bad_layout)
        size = sum(4 * self.rank * (m + n) if m else 4 * s for _, _, s, m, n in p)
        if size != r.remaining:
            raise bad(f"powersgd payload has {r.remaining} bytes of factors, the layout "
                      f"needs {size} at rank {self.rank}")
        return p

    def _decode_pure(self, r: Reader, length: int, layout: Layout) -> array[float]:
        rk = self.rank
        out: list[float] = []
        for _, _, size, m, n in self._body(r, length, layout):
            if not m:
                out.extend(le_array("f", r.take(4 * size, "values")).tolist())
                continue
            p = le_array("f", r.take(4 * m * rk, "P")).tolist()
            q = le_array("f", r.take(4 * n * rk, "Q")).tolist()
            qcols = [q[c::rk] for c in range(rk)]
            for i in range(m):
                row = p[i * rk:(i + 1) * rk]
                p0 = row[0]
                acc = [p0 * v for v in qcols[0]]
                for c in range(1, rk):
                    pc = row[c]
                    acc = [a + pc * v for a, v in zip(acc, qcols[c], strict=True)]
                out.extend(acc)
        return f32_array(out)

    def _decode_np(self, np: ModuleType, r: Reader, length: int, layout: Layout) -> Any:
        rk = self.rank
        out = np.empty(length, dtype=np.float32)
        for _, off, size, m, n in self._body(r, length, layout):
            if not m:
                out[off:off + size] = np.frombuffer(r.take(4 * size, "values"), dtype="<f4")
                continue
            p = np.frombuffer(r.take(4 * m * rk, "P"), dtype="<f4").astype(np.float64)
            q = np.frombuffer(r.take(4 * n * rk, "Q"), dtype="<f4").astype(np.float64)
            p, q = p.reshape(m, rk), q.reshape(n, rk)
            dst = out[off:off + size].reshape(m, n)
            rows = max(1, (1 << 18) // n)
            for i0 in range(0, m, rows):
                i1 = min(m, i0 + rows)
                acc = np.multiply(p[i0:i1, 0, None], q[None, :, 0])
                tmp = np.empty_like(acc)
                for c in range(1, rk):
                    np.multiply(p[i0:i1, c, None], q[None, :, c], out=tmp)
                    acc += tmp
                dst[i0:i1] = acc
        return out


def _bad_layout(message: str) -> BadUpdate:
    return BadUpdate(message, field="layout")


def layout_of(shapes: Sequence[tuple[str, tuple[int, ...]]]) -> tuple[Any, ...]:
    """A contiguous layout from (name, shape) pairs (handy for tests and benchmarks)."""
    from shared.layout import make_manifest

    entries = []
    offset = 0
    for name, shape in shapes:
        size = 1
        for d in shape:
            size *= d
        entries.append((name, shape, offset, size))
        offset += size
    return make_manifest(entries)
