"""A node's update computed and encoded chunk by chunk into a spool file (docs/protocol.md,
"Streamed updates": chunked encoding). Stdlib at import time; numpy through shared.vec.

The one-shot path (shared.update_encoding) holds the whole pseudo-gradient Δ, x = Δ +
residual, the codec's payload and the Submit frame at once: at 125M parameters each float32
copy is 491 MB. Here the trainer hands a `DeltaSource` instead (Δ[lo:hi] computed on demand
from the round's base params and the trained ones), and:

1. a first pass checks that Δ is finite (the same `not_finite` refusal as the one-shot path,
   before the residual is touched);
2. error feedback and the codec run on `COORDS`-value chunks (a multiple of the codec's
   block): x = Δ[lo:hi] + residual[lo:hi] written into the residual in place, the chunk
   encoded, what the codec lost written back: the new residual, in place;
3. each encoded chunk's sections land at their final offsets in a `Spool` (a file the
   driver gives); the payload's SHA-256 and its streaming manifest come from one read pass
   over the spool (`digests`), and the Sender reads each Chunk from it (shared.stream_up).

The spool, not re-encoding on demand: a resumed transfer then reads the bytes the signed
manifest binds (re-encoding would need Δ, i.e. the base and trained params, kept until
the server acknowledges, and the residual as it was before this update), and it survives a
restart of the node (the journal names it).

Bit-identical to the one-shot path (tests/test_chunk_encode.py): raw32, fp16, bf16 (element
by element), int8-block and int4-block (block by block: the payload's scale, offset and
value sections are each written at their offset), topk (its global threshold from the
two counting passes of shared.codecs.topk over the chunks, then one selection pass).
PowerSGD (its factors span whole tensors), worker momentum, client DP, secure aggregation,
p2p runs, the star transport and a platform encoder keep the one-shot path (`refusal`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from shared.codecs import Int4Block, Int8Block
from shared.codecs.topk import TopK, top_indices_blocks
from shared.platform import update_encoder
from shared.stream import n_chunks
from shared.vec import numpy_module

ELEMENTWISE = {"raw32": 4, "fp16": 2, "bf16": 2}  # payload bytes per value after a 1-byte header
CHUNKABLE = (*ELEMENTWISE, "int8-block", "int4-block", "topk")
SPOOLED_TRANSPORTS = ("ws", "star")  # whole updates to the server (p2p hands on shards)
COORDS = 1 << 20  # values per chunk (4 MB of float32), rounded to the codec's block
READ_BYTES = 1 << 22  # spool bytes per read when hashing


class DeltaSource(Protocol):
    """The trainer's pseudo-gradient, computed on demand: `read(lo, hi)` is a new float32
    array of Δ[lo:hi] (the same bits as the whole Δ's); `whole()` the whole Δ (the one-shot
    path's input, for the updates that cannot be encoded by chunks)."""

    n: int

    def read(self, lo: int, hi: int) -> Any: ...

    def whole(self) -> Any: ...


class Spool(Protocol):
    """Where an encoded payload is written (at offsets) and read back from."""

    path: str

    def write_at(self, offset: int, data: bytes | memoryview) -> None: ...

    def read_at(self, offset: int, n: int) -> bytes: ...

    def remove(self) -> None: ...


class FileSpool:
    """A spool file (native nodes: in the state dir, so a journaled update survives)."""

    def __init__(self, path: str, *, create: bool = True) -> None:
        self.path = path
        self.fd = os.open(path, (os.O_RDWR | os.O_CREAT | os.O_TRUNC) if create else os.O_RDONLY,
                          0o600)

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    def read_at(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def remove(self) -> None:
        """Unlink the file; a transfer still reading it goes on (the descriptor is closed
        when this object goes)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self.fd)


@dataclass(frozen=True, kw_only=True)
class Spooled:
    """A pending update whose payload lies in a spool: the Submit's fields without the
    payload, its manifest for `chunk_bytes` chunks (what a StreamSubmit carries)."""

    run_id: str
    round: int
    node_id: str
    codec: str
    length: int  # float32 values the payload decodes to
    digest: str  # SHA-256 of the whole payload (the update's idempotency key)
    size: int  # payload bytes
    chunk_bytes: int
    manifest: bytes  # each chunk's SHA-256, in order
    train_loss: float | None
    samples: int
    compute_s: float
    spool: Spool

    def read_chunk(self, index: int) -> bytes:
        return self.spool.read_at(index * self.chunk_bytes, self.chunk_bytes)


def refusal(codec: Any, *, stream_chunk: int, transport: str, dp: bool, secagg: bool,
            momentum: float, spool: bool) -> str | None:
    """Why this update keeps the one-shot path (None: it is encoded by chunks)."""
    fast = update_encoder()
    reasons = [(not spool, "no spool"), (stream_chunk <= 0, "the run does not stream"),
               (transport not in SPOOLED_TRANSPORTS, f"transport {transport}"),
               (dp, "client DP"),
               (secagg, "secure aggregation"), (momentum > 0, "worker momentum"),
               (codec.name not in CHUNKABLE, f"codec {codec.name}"),
               (fast is not None and codec.name in fast.codecs, "a platform encoder"),
               (numpy_module() is None, "no numpy")]
    return next((why for bad, why in reasons if bad), None)


def chunk_values(codec: Any) -> int:
    """Values per chunk: COORDS rounded up to the codec's block (and even, for int4)."""
    block = codec.block if isinstance(codec, Int8Block | Int4Block) else 1
    unit = math.lcm(block, 2)
    return -(-COORDS // unit) * unit


def blocks(source: DeltaSource, step: int) -> Iterator[tuple[int, Any]]:
    for lo in range(0, source.n, step):
        yield lo, source.read(lo, min(source.n, lo + step))


def all_finite(source: DeltaSource) -> bool:
    np = numpy_module()
    assert np is not None
    return all(bool(np.isfinite(d).all()) for _, d in blocks(source, COORDS))


def _sections(codec: Any, n: int, lo: int, hi: int, part: bytes) -> list[tuple[int, bytes]]:
    """(offset in the whole payload, bytes) of chunk [lo, hi)'s encoded `part` (a payload
    of its own: header + sections)."""
    if codec.name in ELEMENTWISE:
        w = ELEMENTWISE[codec.name]
        return [(0, part[:1]), (1 + w * lo, part[1:])]
    # block quantizers: header(8) | scales[nb] | offsets f32[nb] (minmax) | q
    nb, b0, nbc = -(-n // codec.block), lo // codec.block, -(-(hi - lo) // codec.block)
    ss, off = codec._ssize, 4 if codec.mode == "minmax" else 0
    q_at = 8 + nb * (ss + off)
    out = [(0, part[:8]), (8 + b0 * ss, part[8:8 + nbc * ss])]
    if off:
        out.append((8 + nb * ss + b0 * 4, part[8 + nbc * ss:8 + nbc * (ss + 4)]))
    out.append((q_at + codec._qbytes(lo), part[8 + nbc * (ss + off):]))
    return out


def encode_chunked(codec: Any, source: DeltaSource, *, residual: Any, error_feedback: bool,
                   spool: Spool) -> tuple[int, Any]:
    """Encode Δ (+ `residual`, given up: the new one is written in it) into `spool`:
    (payload size, new residual or None when nothing was lost), what shared.update_encoding
    gives for the whole Δ. Δ must be finite (`all_finite` first); a codec's ValueError
    propagates as there."""
    np = numpy_module()
    assert np is not None
    n = source.n
    res = residual if error_feedback and residual is not None else None
    if res is not None and not (isinstance(res, np.ndarray) and res.dtype == np.float32
                                and res.flags.writeable and res.shape == (n,)):
        res = np.array(res, dtype=np.float32)  # ours from here on: written in place
    if isinstance(codec, TopK):
        return _encode_topk(np, codec, source, res, error_feedback, spool)
    size, lost_any, new = 0, False, res
    for lo, d in blocks(source, chunk_values(codec)):
        hi = lo + d.size
        x = np.add(res[lo:hi], d, out=res[lo:hi]) if res is not None else d
        part = bytes(codec.encode(x))
        for at, data in _sections(codec, n, lo, hi, part):
            spool.write_at(at, data)
            size = max(size, at + len(data))
        if not error_feedback:
            continue
        back = np.asarray(codec.decode(part, hi - lo), dtype=np.float32)
        lost = np.subtract(x, back, out=x)  # in the residual, or in the fresh Δ chunk
        if bool(lost.any()):
            lost_any = True
            if new is None:
                new = np.zeros(n, dtype=np.float32)
        if new is not None and new is not res:
            new[lo:hi] = lost
    return size, (new if lost_any else None)


def _encode_topk(np: Any, codec: TopK, source: DeltaSource, res: Any, error_feedback: bool,
                 spool: Spool) -> tuple[int, Any]:
    """topk: with error feedback x = Δ + residual is written into the residual (a fresh
    array the first round) chunk by chunk, then selected from there; without it the
    selection passes read Δ from the source."""
    n = source.n
    k = codec.k_for(n)
    if error_feedback:
        x = res if res is not None else np.empty(n, dtype=np.float32)
        for lo, d in blocks(source, COORDS):
            if res is not None:
                np.add(x[lo:lo + d.size], d, out=x[lo:lo + d.size])
            else:
                x[lo:lo + d.size] = d

        def xs() -> Iterator[tuple[int, Any]]:
            return ((lo, x[lo:lo + COORDS]) for lo in range(0, n, COORDS))
    else:
        def xs() -> Iterator[tuple[int, Any]]:
            return blocks(source, COORDS)
    if k == n:
        if not all(bool(np.isfinite(b).all()) for _, b in xs()):
            raise ValueError(f"{codec.name}: values contain NaN or infinity; refusing to encode")
        idx = np.arange(n, dtype=np.int64)
    else:
        idx = top_indices_blocks(np, xs, k, codec.name)
    if error_feedback:
        vals = x[idx]
    else:
        vals = np.empty(idx.size, dtype=np.float32)
        for lo, b in xs():
            a, z = np.searchsorted(idx, [lo, lo + b.size])
            vals[a:z] = b[idx[a:z] - lo]
    payload = bytes((codec.wire_id,)) + codec.encode_kept(np, idx, vals)
    spool.write_at(0, payload)
    if not error_feedback:
        return len(payload), None
    x[idx] -= codec.decode_sparse(payload, n)[1]
    return len(payload), (x if any(bool(b.any()) for _, b in xs()) else None)


def digests(spool: Spool, size: int, chunk_bytes: int) -> tuple[str, bytes]:
    """(SHA-256 hex of the whole payload, its manifest for `chunk_bytes` chunks): one read
    pass over the spool, at most one chunk (or READ_BYTES) in memory."""
    whole, entries = hashlib.sha256(), []
    for i in range(n_chunks(size, chunk_bytes)):
        part, at, end = hashlib.sha256(), i * chunk_bytes, min(size, (i + 1) * chunk_bytes)
        while at < end:
            data = spool.read_at(at, min(READ_BYTES, end - at))
            if not data:
                raise OSError(f"spool {spool.path} is shorter than {size} bytes")
            whole.update(data)
            part.update(data)
            at += len(data)
        entries.append(part.digest())
    return whole.hexdigest(), b"".join(entries)
