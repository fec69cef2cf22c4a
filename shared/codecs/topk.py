"""Top-k sparsification: keep the k entries of largest magnitude, send (index, value) pairs.

k = ceil(fraction * n), at least 1 (0 when n = 0), at most n. Selection is deterministic on
both paths: larger |x| first, ties broken by the LOWER index. The kept indices are sent in
ascending order, delta-coded (first index, then gaps >= 1) as LEB128 varints (see
`shared.codecs.varint`); the values in the same order, as

    int8: the int8-block absmax quantizer with fp32 scales over the kept values, one scale per
          `block` kept values (q = rint(v / scale) in float64, scale = max|v| / 127);
    fp16: IEEE half, nearest-even, saturating at +-65504 (as the fp16 codec);
    int2: sign + one magnitude bit, two float32 levels per `block` kept values
          (shared.codecs.int2; SparseLoCo's 2-bit values).

Payload (little-endian):

    u8 5 | u8 values (0 int8, 1 fp16, 2 int2) | u16 0 (reserved) | u32 k | u32 block (0 for fp16)
    | int8: scales f32[ceil(k / block)] | q i8[k]
    | fp16: f16[k]
    | int2: levels f32[2 * ceil(k / block)] | codes u8[ceil(k / 4)]
    | varint gaps[k], filling the payload to its end

Decoders refuse k > length, indices that do not increase or reach `length`, non-canonical
varints, trailing bytes, and the int8 quantizer's bad scales (BadUpdate).
"""

from __future__ import annotations

import math
import struct
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

from shared.codecs import int2, varint
from shared.codecs.base import (
    CodecBase,
    Data,
    Layout,
    Reader,
    bad,
    build,
    check_finite_list,
    f32_array,
)
from shared.codecs.floats import f16_pack, f16_pack_np
from shared.codecs.quant import MAX_BLOCK, Int8Block
from shared.vec import numpy_module

VALUE_KINDS = ("int8", "fp16", "int2")


@dataclass(frozen=True, kw_only=True, slots=True)
class TopK(CodecBase):
    """Largest-magnitude fraction of the entries; pair it with error feedback."""

    name: ClassVar[str] = "topk"
    wire_id: ClassVar[int] = 5
    fraction: float = 0.01  # share of entries kept, in (0, 1]
    values: str = "int8"  # "int8" (per-block fp32 scales), "fp16" or "int2" (2 levels/block)
    block: int = 256  # kept values per int8 scale

    def __post_init__(self) -> None:
        if (not isinstance(self.fraction, int | float) or isinstance(self.fraction, bool)
                or not 0.0 < self.fraction <= 1.0):
            raise ValueError(f"fraction must be a number in (0, 1], got {self.fraction!r}")
        if self.values not in VALUE_KINDS:
            raise ValueError(f"values must be one of {VALUE_KINDS}, got {self.values!r}")
        if (not isinstance(self.block, int) or isinstance(self.block, bool)
                or not 1 <= self.block <= MAX_BLOCK):
            raise ValueError(f"block must be an int in [1, {MAX_BLOCK}], got {self.block!r}")

    def k_for(self, n: int) -> int:
        if n >= varint.LIMIT:
            raise ValueError(f"topk indices are 32-bit: {n} values is too many")
        return 0 if n == 0 else min(n, max(1, math.ceil(self.fraction * n)))

    def _quant(self) -> Int8Block:
        return Int8Block(block=self.block, mode="absmax", scale_dtype="fp32")

    def _values_size(self, k: int) -> int:
        if self.values == "fp16":
            return 2 * k
        if self.values == "int2":
            return int2.size(k, self.block)
        return self._quant().max_encoded_size(k) - 8  # scales + q, without its header

    def max_encoded_size(self, length: int, *, layout: Layout = None) -> int:
        k = self.k_for(length)
        return 12 + self._values_size(k) + varint.MAX_BYTES * k

    @property
    def estimated_ratio(self) -> float:
        """Typical: values + the mean varint size of geometric gaps (mean 1/fraction)."""
        miss = 1.0 - self.fraction  # P(gap >= g) = miss ** (g - 1)
        gap_bytes = 1.0 + sum(miss ** ((1 << (7 * j)) - 1) for j in range(1, varint.MAX_BYTES))
        per_kept = self._values_size(1 << 16) / (1 << 16) + gap_bytes
        return self.fraction * per_kept / 4

    # -- header ------------------------------------------------------------------------------
    def _header(self, k: int) -> bytes:
        block = 0 if self.values == "fp16" else self.block
        return struct.pack("<BHII", VALUE_KINDS.index(self.values), 0, k, block)

    def _params(self) -> bytes:
        return b""  # k depends on the input: encode writes the header itself

    @classmethod
    def _read_params(cls, r: Reader) -> Any:
        kind, zero, k, block = r.unpack("<BHII", "header")
        if kind >= len(VALUE_KINDS) or zero:
            raise bad(f"topk header: values kind {kind}, reserved {zero}")
        if kind == 1:
            if block:
                raise bad(f"topk header: fp16 values with block {block}")
            block = 256
        elif not 1 <= block <= MAX_BLOCK:
            raise bad(f"topk header: block {block}")
        return _Parsed(build(cls, values=VALUE_KINDS[kind], block=block), k)

    # -- encode ------------------------------------------------------------------------------
    def _encode_pure(self, xs: list[float], layout: Layout) -> bytes:
        check_finite_list(xs, self.name)
        n = len(xs)
        k = self.k_for(n)
        mags = [abs(v) for v in xs]
        # stable sort, descending: equal magnitudes keep ascending index order
        idx = sorted(sorted(range(n), key=mags.__getitem__, reverse=True)[:k])
        vals = [xs[i] for i in idx]
        quant = self._quant()
        vbytes = (f16_pack(vals) if self.values == "fp16" else int2.encode_pure(vals, self.block)
                  if self.values == "int2" else quant._encode_pure(vals, None))
        gaps = [b - a for a, b in zip([0, *idx], idx, strict=False)]
        return b"".join((self._header(k), vbytes, varint.encode_pure(gaps)))

    def _encode_np(self, np: ModuleType, x: Any, layout: Layout) -> bytes:
        n = x.size
        k = self.k_for(n)
        if k == n:
            if not np.isfinite(x).all():
                raise ValueError(f"{self.name}: values contain NaN or infinity; refusing to "
                                 "encode")
            idx = np.arange(n, dtype=np.int64)
        else:
            idx = _top_indices(np, x, k, self.name)
        return self.encode_kept(np, idx, x[idx])

    def encode_kept(self, np: ModuleType, idx: Any, vals: Any) -> bytes:
        """The payload after its wire id, of the kept entries: ascending int64 `idx`, float32
        `vals` (the numpy path's tail; shared.chunk_encode selects them chunk by chunk)."""
        if self.values == "fp16":
            vbytes = f16_pack_np(np, vals)
        elif self.values == "int2":
            vbytes = int2.encode_np(np, vals, self.block)
        else:
            vbytes = self._quant()._encode_np(np, vals, None)
        gaps = np.diff(idx, prepend=0)
        return b"".join((self._header(idx.size), vbytes, varint.encode_np(np, gaps)))

    # -- decode ------------------------------------------------------------------------------
    @classmethod
    def decode_sparse(cls, data: Data, length: int) -> tuple[Any, Any]:
        """(indices, values) of a topk payload (numpy only): int64 ascending indices and their
        float32 values, the rest being 0, as `decode_payload` would have them, without the
        n-sized vector. The same checks (BadUpdate); values are not checked for finiteness."""
        np = numpy_module()
        if np is None:
            raise ValueError("decode_sparse needs numpy")
        length, r, parsed = cls.open_payload(data, length)
        with np.errstate(all="ignore"):
            idx, vals = parsed._sparse_np(np, r, length)
        return idx, vals

    def _split(self, r: Reader, length: int, k: int) -> tuple[memoryview, memoryview]:
        if k > length:
            raise bad(f"topk: k = {k} exceeds length {length}")
        vbytes = r.take(self._values_size(k), "values")
        if not k <= r.remaining <= varint.MAX_BYTES * k:
            raise bad(f"topk: {r.remaining} bytes of varints for k = {k}")
        return vbytes, r.take(r.remaining, "indices")



SELECT_BLOCK = 1 << 20  # values per pass when selecting above the threshold


Blocks = Callable[[], Iterator[tuple[int, Any]]]  # a fresh pass: (offset, float32 block)


def _top_indices(np: ModuleType, x: Any, k: int, name: str) -> Any:
    """The k indices of largest |x| (ties: lower index first), ascending. The threshold (the
    k-th largest |x|) comes from two counting passes over blocks of x (`_kth_magnitude`),
    then one pass selects above it: no whole-vector temporary (at 125M values a copy of |x|
    is 491 MB, and the server's outer step and a node's encode both peak here)."""
    n = x.size
    return top_indices_blocks(np, lambda: ((lo, x[lo:lo + SELECT_BLOCK])
                                           for lo in range(0, n, SELECT_BLOCK)), k, name)


def top_indices_blocks(np: ModuleType, blocks: Blocks, k: int, name: str) -> Any:
    """`_top_indices` over a vector given as consecutive blocks, three passes of `blocks()`
    (shared.chunk_encode: a node's pseudo-gradient computed a chunk at a time)."""
    t = _kth_magnitude(np, blocks, k, name)
    above, ties = [], []
    n_above = 0
    for lo, xb in blocks():
        m = np.abs(xb)
        a = np.flatnonzero(m > t)
        above.append(a + lo)
        n_above += a.size
        ties.append(np.flatnonzero(m == t) + lo)
    tie = np.concatenate(ties)[:k - n_above]  # lowest indices first
    return np.sort(np.concatenate([*above, tie]))


def _kth_magnitude(np: ModuleType, blocks: Blocks, k: int, name: str) -> Any:
    """The k-th largest |x| (1 <= k <= n) as a float32, exactly what partitioning |x| gives.
    For finite float32 values, |x|'s bit pattern (the sign bit cleared) orders as |x| does:
    one pass counts the patterns' top 16 bits, a second counts the low 16 bits of those in
    the top bucket that holds the k-th; each pass holds one block's temporaries."""
    def hist(shift: int, top: int | None) -> Any:
        counts = np.zeros(1 << 16, dtype=np.int64)
        for _, xb in blocks():
            b = xb.reshape(-1).view(np.uint32) & np.uint32(0x7FFFFFFF)
            if top is None:
                if int(b.max()) >= 0x7F800000:
                    raise ValueError(f"{name}: values contain NaN or infinity; refusing to "
                                     "encode")
            else:
                b = b[(b >> np.uint32(16)) == np.uint32(top)]
            counts += np.bincount((b >> np.uint32(shift)) & np.uint32(0xFFFF),
                                  minlength=1 << 16)
        return counts

    def bucket(counts: Any, want: int) -> tuple[int, int]:
        """(the bucket holding the want-th largest, how many lie in higher buckets)"""
        above = np.cumsum(counts[::-1])  # above[j]: count in the top j + 1 buckets
        j = int(np.searchsorted(above, want))  # the first j with above[j] >= want
        return (1 << 16) - 1 - j, int(above[j - 1]) if j else 0

    hi, higher = bucket(hist(16, None), k)
    lo, _ = bucket(hist(0, hi), k - higher)
    return np.array([(hi << 16) | lo], dtype=np.uint32).view(np.float32)[0]


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A TopK codec plus the k its header declared: what the body decoders need."""

    codec: TopK
    k: int

    def _decode_pure(self, r: Reader, length: int, layout: Layout) -> array[float]:
        c, k = self.codec, self.k
        vbytes, ibytes = c._split(r, length, k)
        idx = varint.decode_pure(ibytes, k)
        pos = 0
        for j, gap in enumerate(idx):
            if j and gap == 0:
                raise bad("topk: indices do not increase")
            pos += gap
            idx[j] = pos
        if k and idx[-1] >= length:
            raise bad(f"topk: index {idx[-1]} >= length {length}")
        if c.values == "fp16":
            vals: Any = struct.unpack(f"<{k}e", vbytes)
        elif c.values == "int2":
            vals = int2.decode_pure(vbytes, k, c.block)
        else:
            vals = c._quant()._decode_pure(Reader(vbytes, c.name), k, None)
        out = array("f", bytes(4 * length))
        for i, v in zip(idx, vals, strict=True):
            out[i] = v
        return f32_array(out)

    def _decode_np(self, np: ModuleType, r: Reader, length: int, layout: Layout) -> Any:
        idx, vals = self._sparse_np(np, r, length)
        out = np.zeros(length, dtype=np.float32)
        out[idx] = vals
        return out

    def _sparse_np(self, np: ModuleType, r: Reader, length: int) -> tuple[Any, Any]:
        c, k = self.codec, self.k
        vbytes, ibytes = c._split(r, length, k)
        gaps = varint.decode_np(np, ibytes, k)
        if k > 1 and int(gaps[1:].min()) == 0:
            raise bad("topk: indices do not increase")
        idx = np.cumsum(gaps, out=gaps)  # in place: one k-sized int64 array, not two
        if k and int(idx[-1]) >= length:
            raise bad(f"topk: index {int(idx[-1])} >= length {length}")
        if c.values == "fp16":
            vals = np.frombuffer(vbytes, dtype="<f2").astype(np.float32)
        elif c.values == "int2":
            vals = int2.decode_np(np, vbytes, k, c.block)
        else:
            vals = c._quant()._decode_np(np, Reader(vbytes, c.name), k, None)
        return idx, np.asarray(vals, dtype=np.float32)
