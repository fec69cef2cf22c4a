"""Data-channel framing: one protocol frame as ordered chunks under the 256 KiB message limit.

WebRTC data channels (SCTP) cap one message at 256 KiB (`max-message-size:262144`), so a frame
(shared.frame, up to tens of MB for an update) travels as chunks on a reliable, ordered
channel. Each chunk is a 20-byte header + data; the first chunk also carries the SHA-256 of
the whole frame, checked when the last chunk arrives (a digest per frame).

| offset | size | field                                                        |
|--------|------|--------------------------------------------------------------|
| 0      | 2    | magic b"DC"                                                  |
| 2      | 1    | version (1)                                                  |
| 3      | 1    | kind: 0 data, 1 cancel (the sender abandoned this transfer)  |
| 4      | 4    | transfer id, u32 LE (the sender's counter)                   |
| 8      | 4    | chunk index, u32 LE (0, 1, ... in order)                     |
| 12     | 4    | number of chunks, u32 LE                                     |
| 16     | 4    | total frame length in bytes, u32 LE                          |
| 20     | 32   | chunk 0 only: SHA-256 of the whole frame                     |
| 20/52  | ...  | data                                                         |

`Reassembler` checks every field against what it expects and its limits BEFORE buffering, and
raises shared.errors typed errors (FrameError / FrameTooLarge); a transfer that fails is
forgotten, the channel stays usable. Pure: stdlib only (runs in Pyodide).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from shared.errors import FrameError, FrameTooLarge

MAGIC = b"DC"
VERSION = 1
KIND_DATA, KIND_CANCEL = 0, 1
HEADER = struct.Struct("<2sBBIIII")  # 20 bytes
DIGEST_LEN = 32
MAX_MESSAGE = 256 * 1024  # the data-channel message limit
CHUNK_DATA = MAX_MESSAGE - HEADER.size - DIGEST_LEN  # data bytes per chunk (same for all)
DEFAULT_MAX_FRAME = 64 * 1024 * 1024

__all__ = ["CHUNK_DATA", "HEADER", "MAX_MESSAGE", "Reassembler", "cancel_chunk", "chunks"]


def chunks(frame: bytes | bytearray | memoryview, transfer_id: int, *,
           chunk_data: int = CHUNK_DATA) -> Iterator[bytes]:
    """The chunks of one frame, in order (lazily: the caller sends them as the channel drains)."""
    if not 1 <= chunk_data <= CHUNK_DATA:
        raise ValueError(f"chunk_data must be in 1..{CHUNK_DATA}, got {chunk_data}")
    if not 0 <= transfer_id < 2**32:
        raise ValueError("transfer_id must fit in u32")
    view = memoryview(frame).cast("B")
    total = len(view)
    if total >= 2**32:
        raise ValueError("frame too large for a u32 length")
    n = max(1, -(-total // chunk_data))
    digest = hashlib.sha256(view).digest()
    for i in range(n):
        head = HEADER.pack(MAGIC, VERSION, KIND_DATA, transfer_id, i, n, total)
        data = bytes(view[i * chunk_data:(i + 1) * chunk_data])
        yield head + digest + data if i == 0 else head + data


def cancel_chunk(transfer_id: int) -> bytes:
    """Tells the receiver to drop a half-sent transfer (e.g. the round closed)."""
    return HEADER.pack(MAGIC, VERSION, KIND_CANCEL, transfer_id, 0, 0, 0)


@dataclass
class _Transfer:
    n: int
    total: int
    digest: bytes
    next: int = 0
    parts: list[bytes] = field(default_factory=list)
    size: int = 0


class Reassembler:
    """Receiver side of one channel. `feed(chunk)` returns a whole frame when its last chunk
    arrives (digest checked), else None. Limits: `max_frame` bytes per frame and
    `max_transfers` half-received frames at a time."""

    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME, max_transfers: int = 4) -> None:
        self.max_frame, self.max_transfers = max_frame, max_transfers
        self.open: dict[int, _Transfer] = {}
        self.cancelled = 0

    def feed(self, chunk: bytes | bytearray | memoryview) -> bytes | None:
        b = bytes(chunk)
        if len(b) < HEADER.size:
            raise FrameError(f"data-channel chunk of {len(b)} bytes is shorter than its header")
        if len(b) > MAX_MESSAGE:
            raise FrameTooLarge(f"data-channel chunk of {len(b)} bytes exceeds {MAX_MESSAGE}")
        magic, version, kind, tid, idx, n, total = HEADER.unpack_from(b)
        if magic != MAGIC:
            raise FrameError("data-channel chunk: bad magic")
        if version != VERSION:
            raise FrameError(f"data-channel chunk version {version}; this side speaks {VERSION}")
        if kind == KIND_CANCEL:
            self.cancelled += self.open.pop(tid, None) is not None
            return None
        if kind != KIND_DATA:
            raise FrameError(f"data-channel chunk: unknown kind {kind}")
        try:
            return self._data(b, tid, idx, n, total)
        except (FrameError, FrameTooLarge):
            self.open.pop(tid, None)
            raise

    def _data(self, b: bytes, tid: int, idx: int, n: int, total: int) -> bytes | None:
        t = self.open.get(tid)
        if t is None:
            if idx != 0:
                raise FrameError(f"transfer {tid}: chunk {idx} before chunk 0")
            if total > self.max_frame:
                raise FrameTooLarge(f"transfer {tid}: frame of {total} bytes exceeds the "
                                    f"{self.max_frame} byte limit")
            if not 1 <= n <= max(1, total):  # every chunk carries data, but an empty frame
                raise FrameError(f"transfer {tid}: {n} chunks for {total} bytes")
            if len(self.open) >= self.max_transfers:
                raise FrameError(f"more than {self.max_transfers} transfers in flight")
            if len(b) < HEADER.size + DIGEST_LEN:
                raise FrameError(f"transfer {tid}: chunk 0 has no digest")
            t = _Transfer(n=n, total=total, digest=b[HEADER.size:HEADER.size + DIGEST_LEN])
            data = b[HEADER.size + DIGEST_LEN:]
            self.open[tid] = t
        else:
            if idx != t.next or n != t.n or total != t.total:
                raise FrameError(f"transfer {tid}: chunk {idx}/{n} of {total} bytes does not "
                                 f"follow chunk {t.next - 1}/{t.n} of {t.total}")
            data = b[HEADER.size:]
        t.size += len(data)
        if t.size > t.total:
            raise FrameError(f"transfer {tid}: more data than the declared {t.total} bytes")
        t.parts.append(data)
        t.next = idx + 1
        if t.next < t.n:
            return None
        del self.open[tid]
        if t.size != t.total:
            raise FrameError(f"transfer {tid}: {t.size} bytes received, {t.total} declared")
        frame = b"".join(t.parts)
        if hashlib.sha256(frame).digest() != t.digest:
            raise FrameError(f"transfer {tid}: frame digest mismatch")
        return frame

    def cancel_all(self) -> int:
        """Forget every half-received transfer (e.g. the round closed); returns how many."""
        n = len(self.open)
        self.open.clear()
        return n
