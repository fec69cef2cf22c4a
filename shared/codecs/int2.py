"""2-bit values for top-k (SparseLoCo, Sarfi et al. 2025): sign + one magnitude bit.

The kept values are cut into blocks of `block`; each block sends two float32 levels
(lo, hi) and one 2-bit code per value:

    bit 0: sign (1 = negative)      bit 1: magnitude (1 = hi)

Encode, per block: m = mean |v| (float64); a value is "hi" when |v| > m; lo = mean |v| of the
lo values, hi = mean |v| of the hi values (one Lloyd step of a 2-level quantizer of the
magnitudes; a level with no value is 0), each rounded to float32. Decode: +-level, exactly
those float32 numbers, on every path (the server and the nodes decode the SparseLoCo downlink
with it and must agree bit for bit). Codes are packed four to a byte, the first value in the
lowest bits; the pad bits of the last byte must be 0.

Bytes: levels f32[2 * ceil(k / block)] | codes u8[ceil(k / 4)].
"""

from __future__ import annotations

import struct
from types import ModuleType
from typing import Any

from shared.codecs.base import bad


def size(k: int, block: int) -> int:
    return 8 * (-(-k // block)) + (-(-k // 4))


def _levels_pure(mags: list[float]) -> tuple[float, float, list[int]]:
    m = sum(mags) / len(mags)
    hi_bits = [1 if a > m else 0 for a in mags]
    n_hi = sum(hi_bits)
    s_hi = sum(a for a, h in zip(mags, hi_bits, strict=True) if h)
    s_lo = sum(mags) - s_hi if n_hi else sum(mags)
    lo = s_lo / (len(mags) - n_hi) if len(mags) > n_hi else 0.0
    hi = s_hi / n_hi if n_hi else 0.0
    return lo, hi, hi_bits


def encode_pure(vals: list[float], block: int) -> bytes:
    k = len(vals)
    levels: list[float] = []
    codes: list[int] = []
    for s in range(0, k, block):
        chunk = vals[s:s + block]
        lo, hi, hi_bits = _levels_pure([abs(v) for v in chunk])
        levels += [lo, hi]
        codes += [(2 if h else 0) | (1 if v < 0 else 0) for v, h in zip(chunk, hi_bits,
                                                                          strict=True)]
    codes += [0] * (-k % 4)
    packed = bytes(codes[i] | codes[i + 1] << 2 | codes[i + 2] << 4 | codes[i + 3] << 6
                   for i in range(0, len(codes), 4))
    return struct.pack(f"<{len(levels)}f", *levels) + packed


def chunk(block: int) -> int:
    """Values per pass (a multiple of `block` and of 4, about 2**20): blocks and code bytes
    never straddle two passes, so the passes' levels and codes are the whole vector's."""
    return 4 * block * max(1, (1 << 18) // block)


def encode_np(np: ModuleType, vals: Any, block: int) -> bytes:
    step = chunk(block)
    if vals.size <= step:
        return b"".join(_encode_np(np, vals, block))
    parts = [_encode_np(np, vals[lo:lo + step], block) for lo in range(0, vals.size, step)]
    return b"".join([p[0] for p in parts] + [p[1] for p in parts])


def _encode_np(np: ModuleType, vals: Any, block: int) -> tuple[bytes, bytes]:
    k = int(vals.size)
    nb = -(-k // block)
    mags = np.abs(vals.astype(np.float64))
    starts = np.arange(0, k, block)
    counts = np.diff(np.append(starts, k))
    blk = np.repeat(np.arange(nb), counts)
    # the same summation order as the pure path is not needed: only the decoded levels must
    # agree between server and nodes, and both decode the same bytes
    m = np.add.reduceat(mags, starts) / counts if k else np.zeros(0)
    hi_bits = mags > m[blk]
    n_hi = np.bincount(blk, weights=hi_bits, minlength=nb)
    s_hi = np.bincount(blk, weights=np.where(hi_bits, mags, 0.0), minlength=nb)
    s_all = np.bincount(blk, weights=mags, minlength=nb)
    n_lo = counts - n_hi
    lo = np.where(n_lo > 0, (s_all - s_hi) / np.maximum(n_lo, 1), 0.0)
    hi = np.where(n_hi > 0, s_hi / np.maximum(n_hi, 1), 0.0)
    levels = np.stack([lo, hi], axis=1).astype("<f4").ravel()
    codes = (hi_bits.astype(np.uint8) << 1) | (vals < 0).astype(np.uint8)
    codes = np.concatenate([codes, np.zeros(-k % 4, dtype=np.uint8)]).reshape(-1, 4)
    packed = codes[:, 0] | codes[:, 1] << 2 | codes[:, 2] << 4 | codes[:, 3] << 6
    return levels.tobytes(), packed.astype(np.uint8).tobytes()


def _split(data: memoryview, k: int, block: int) -> tuple[memoryview, memoryview]:
    if len(data) != size(k, block):
        raise bad(f"int2 values: {len(data)} bytes for k = {k}, block {block}")
    nl = 8 * (-(-k // block))
    return data[:nl], data[nl:]


def decode_np(np: ModuleType, data: memoryview, k: int, block: int) -> Any:
    lv, cb = _split(data, k, block)
    levels = np.frombuffer(lv, dtype="<f4").reshape(-1, 2)
    if not np.isfinite(levels).all() or (levels < 0).any():
        raise bad("int2 values: a level is negative or not finite")
    packed = np.frombuffer(cb, dtype=np.uint8)
    if k % 4 and packed[-1] >> (2 * (k % 4)):
        raise bad("int2 values: non-zero pad bits")
    out = np.empty(k, dtype=np.float32)
    step = chunk(block)  # a pass's temporaries are a few times its size, not k's
    for lo in range(0, k, step):
        hi = min(k, lo + step)
        p = packed[lo // 4:-(-hi // 4)]
        codes = np.stack([p & 3, p >> 2 & 3, p >> 4 & 3, p >> 6], axis=1).ravel()[:hi - lo]
        mag = levels[np.arange(lo, hi) // block, codes >> 1]
        out[lo:hi] = np.where(codes & 1, -mag, mag)
    return out


def decode_pure(data: memoryview, k: int, block: int) -> list[float]:
    lv, cb = _split(data, k, block)
    levels = struct.unpack(f"<{len(lv) // 4}f", lv)
    if any(not (0.0 <= x < float("inf")) for x in levels):
        raise bad("int2 values: a level is negative or not finite")
    codes = [b >> s & 3 for b in bytes(cb) for s in (0, 2, 4, 6)]
    if any(codes[k:]):
        raise bad("int2 values: non-zero pad bits")
    out = []
    for i in range(k):
        c = codes[i]
        mag = levels[2 * (i // block) + (c >> 1)]
        out.append(-mag if c & 1 else mag)
    return out
