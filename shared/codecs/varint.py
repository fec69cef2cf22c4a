"""Unsigned LEB128 varints for sorted indices (delta-coded), pure Python and numpy.

Each value (< 2**32) is written 7 bits at a time, least significant group first; every byte
but the last has its high bit set. Encodings are canonical: the decoder refuses a varint
longer than 5 bytes, one that exceeds 2**32 - 1, and a multi-byte varint whose last byte is
0 (a padded, non-minimal form), so one list of values has exactly one encoding.

Index lists travel as gaps: d[0] = i[0], d[j] = i[j] - i[j-1] (>= 1, strictly increasing).
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Any

from shared.codecs.base import bad

MAX_BYTES = 5
LIMIT = 1 << 32


def encode_pure(values: Iterable[int]) -> bytes:
    out = bytearray()
    for v in values:
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def decode_pure(data: memoryview | bytes, count: int) -> list[int]:
    """Exactly `count` varints filling `data` exactly."""
    out: list[int] = []
    v = shift = nbytes = 0
    for b in bytes(data):
        v |= (b & 0x7F) << shift
        nbytes += 1
        if b & 0x80:
            shift += 7
            if nbytes == MAX_BYTES:
                raise bad("varint longer than 5 bytes")
            continue
        if nbytes > 1 and b == 0:
            raise bad("non-minimal varint")
        if v >= LIMIT:
            raise bad("varint exceeds 2**32 - 1")
        out.append(v)
        v = shift = nbytes = 0
    if nbytes:
        raise bad("varint section ends inside a varint")
    if len(out) != count:
        raise bad(f"varint section holds {len(out)} values, expected {count}")
    return out


CHUNK = 1 << 20  # values (encode) or bytes (decode) per pass: temporaries stay this size


def encode_np(np: ModuleType, values: Any) -> bytes:
    """uint64 array (values < 2**32) -> LEB128 bytes, CHUNK values at a time (the bytes of
    consecutive values are consecutive: the same output as one pass)."""
    values = np.asarray(values)
    if values.size <= CHUNK:
        return _encode_np(np, values)
    return b"".join(_encode_np(np, values[lo:lo + CHUNK])
                    for lo in range(0, values.size, CHUNK))


def _encode_np(np: ModuleType, values: Any) -> bytes:
    v = np.asarray(values, dtype=np.uint64)
    if v.size == 0:
        return b""
    nbytes = np.ones(v.size, dtype=np.int64)
    for j in range(1, MAX_BYTES):
        nbytes += v >= np.uint64(1 << (7 * j))
    ends = np.cumsum(nbytes)
    starts = ends - nbytes
    out = np.zeros(int(ends[-1]), dtype=np.uint8)
    for j in range(MAX_BYTES):
        sel = np.flatnonzero(nbytes > j)
        if sel.size == 0:
            break
        group = (v[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (nbytes[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (group | more).astype(np.uint8)
    return bytes(out.tobytes())


def decode_np(np: ModuleType, data: memoryview | bytes, count: int) -> Any:
    """Exactly `count` varints filling `data` exactly -> int64 array. Sections longer than
    CHUNK bytes are cut after a varint's last byte and decoded piece by piece into the one
    output array (the same values, the same refusals)."""
    b = np.frombuffer(data, dtype=np.uint8)
    if b.size <= CHUNK:
        return _decode_np(np, b, count)
    out = np.empty(count, dtype=np.int64)
    lo = pos = 0
    while lo < b.size:
        hi = min(b.size, lo + CHUNK)
        if hi < b.size:  # end the piece after its last complete varint
            last = np.flatnonzero(b[lo:hi] < 0x80)
            if last.size == 0:
                raise bad("varint longer than 5 bytes")
            hi = lo + int(last[-1]) + 1
        piece = b[lo:hi]
        n = int(np.count_nonzero(piece < 0x80))
        if pos + n > count:
            raise bad(f"varint section holds more than {count} values, expected {count}")
        out[pos:pos + n] = _decode_np(np, piece, n)
        pos += n
        lo = hi
    if pos != count:
        raise bad(f"varint section holds {pos} values, expected {count}")
    return out


def _decode_np(np: ModuleType, b: Any, count: int) -> Any:
    if b.size == 0:
        if count:
            raise bad(f"varint section holds 0 values, expected {count}")
        return np.zeros(0, dtype=np.int64)
    if b[-1] & 0x80:
        raise bad("varint section ends inside a varint")
    ends = np.flatnonzero(b < 0x80)
    if ends.size != count:
        raise bad(f"varint section holds {ends.size} values, expected {count}")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    nbytes = ends - starts + 1
    if int(nbytes.max()) > MAX_BYTES:
        raise bad("varint longer than 5 bytes")
    if ((nbytes > 1) & (b[ends] == 0)).any():
        raise bad("non-minimal varint")
    v = np.zeros(count, dtype=np.int64)
    for j in range(MAX_BYTES):
        sel = np.flatnonzero(nbytes > j)
        if sel.size == 0:
            break
        v[sel] |= (b[starts[sel] + j].astype(np.int64) & 0x7F) << (7 * j)
    if int(v.max()) >= LIMIT:
        raise bad("varint exceeds 2**32 - 1")
    return v
