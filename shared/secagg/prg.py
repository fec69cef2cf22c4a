"""The mask PRG: SHAKE-128 in blocks, bit-identical in CPython, Pyodide and JavaScript.

    mask(seed)[i] = u32 LE word (i mod B) of SHAKE-128(DOMAIN || seed || u64 LE (i div B))

with B = 65,536 words per block (256 KiB). Blocks let a p2p shard owner expand only its slice;
SHAKE's output for a shorter length is a prefix of a longer one, so a partial block costs only
what it covers. Python's hashlib has SHAKE-128 natively and in Pyodide; JS has it in
@noble/hashes (already vendored under @noble/post-quantum). Golden vectors:
shared/testdata/secagg.json.

Ring arithmetic is in Z_2^32: numpy uint32 natively, array("I") in the tab (pure Python).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from typing import Any

from shared.vec import numpy_module

DOMAIN = b"DAAP-SECAGG-PRG-v1"
BLOCK = 1 << 16
MASK32 = 0xFFFFFFFF
Ring = Any  # numpy.ndarray[uint32] | array.array("I")


def _block_bytes(seed: bytes, block: int, words: int) -> bytes:
    return hashlib.shake_128(DOMAIN + seed + block.to_bytes(8, "little")).digest(4 * words)


def mask_bytes(seed: bytes, start: int, stop: int) -> bytes:
    """Little-endian u32 words [start, stop) of the mask of `seed` (32 bytes)."""
    if len(seed) != 32:
        raise ValueError("a mask seed is 32 bytes")
    if not 0 <= start <= stop:
        raise ValueError(f"bad range [{start}, {stop})")
    out = []
    for block in range(start // BLOCK, (stop + BLOCK - 1) // BLOCK):
        lo, hi = max(start, block * BLOCK), min(stop, (block + 1) * BLOCK)
        data = _block_bytes(seed, block, hi - block * BLOCK)
        out.append(data[4 * (lo - block * BLOCK):])
    return b"".join(out)


def _u32(data: bytes, use_numpy: bool) -> Ring:
    np = numpy_module() if use_numpy else None
    if np is not None:
        return np.frombuffer(data, dtype="<u4").astype(np.uint32)
    out = array("I")
    if out.itemsize != 4:  # pragma: no cover - every platform we run on has 4-byte "I"
        raise RuntimeError("array('I') is not 32-bit here")
    out.frombytes(data)
    if sys.byteorder == "big":  # pragma: no cover
        out.byteswap()
    return out


def mask(seed: bytes, start: int, stop: int, *, use_numpy: bool = True) -> Ring:
    return _u32(mask_bytes(seed, start, stop), use_numpy)


def zeros(n: int, *, use_numpy: bool = True) -> Ring:
    np = numpy_module() if use_numpy else None
    if np is not None:
        return np.zeros(n, dtype=np.uint32)
    return array("I", bytes(4 * n))


def is_numpy_ring(v: Ring) -> bool:
    np = numpy_module()
    return np is not None and isinstance(v, np.ndarray)


def add_into(acc: Ring, other: Ring, sign: int = 1) -> Ring:
    """acc += sign * other (mod 2^32), in place where it can; returns acc."""
    if is_numpy_ring(acc):
        np = numpy_module()
        assert np is not None
        o = np.asarray(other, dtype=np.uint32)
        if sign > 0:
            np.add(acc, o, out=acc)
        else:
            np.subtract(acc, o, out=acc)
        return acc
    if len(acc) != len(other):
        raise ValueError(f"ring vectors of {len(acc)} and {len(other)} values")
    if sign > 0:
        for i, v in enumerate(other):
            acc[i] = (acc[i] + v) & MASK32
    else:
        for i, v in enumerate(other):
            acc[i] = (acc[i] - v) & MASK32
    return acc


def add_mask(acc: Ring, seed: bytes, start: int, sign: int = 1) -> Ring:
    """acc += sign * mask(seed)[start : start + len(acc)]."""
    return add_into(acc, mask(seed, start, start + len(acc), use_numpy=is_numpy_ring(acc)),
                    sign)


def ring_copy(v: Ring) -> Ring:
    return v.copy() if is_numpy_ring(v) else array("I", v)


def ring_bytes(v: Ring) -> bytes:
    if is_numpy_ring(v):
        return bytes(v.astype("<u4", copy=False).tobytes())
    out = array("I", v)
    if sys.byteorder == "big":  # pragma: no cover
        out.byteswap()
    return out.tobytes()


def ring_from_bytes(data: bytes, *, use_numpy: bool = True) -> Ring:
    if len(data) % 4:
        raise ValueError(f"{len(data)} bytes is not a whole number of u32 words")
    return _u32(data, use_numpy)
