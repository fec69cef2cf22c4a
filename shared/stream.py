"""Chunked transfer of one large update (docs/protocol.md, "Streamed updates"). Pure stdlib.

A payload of `size` bytes travels as `n_chunks(size, chunk_bytes)` chunks of `chunk_bytes`
(the last one shorter). Its manifest is the concatenation of every chunk's 32-byte SHA-256;
the sender signs the manifest once (in a `StreamSubmit`, whose `digest` is the SHA-256 of the
whole payload, as a `Submit`'s), so every chunk is checked on arrival against its entry and
the whole transfer is checked once more against `digest` when complete.

`Reassembly` is the receiver's progress for one transfer: which chunks are verified, where
the next one may start, and the typed refusals (shared.errors): a chunk whose hash is not its
manifest entry (`bad_chunk`), one already verified (`duplicate_chunk`), one beyond the
receive window (`chunk_out_of_window`). A refused chunk leaves the progress exactly as it
was. After a reconnect the transfer resumes from `resume()`: the first chunk not verified
(chunks verified beyond it are forgotten; the sender sends in order from there).
The bytes themselves go to a `sink(offset, data)` the caller supplies (a spool file).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

from shared.errors import BadChunk, ChunkOutOfWindow, DuplicateChunk

DIGEST_LEN = 32  # one manifest entry: a chunk's SHA-256
DEFAULT_WINDOW = 16  # chunks a receiver takes ahead of the first one missing
MIN_CHUNK = 1024  # smallest chunk size accepted (a manifest entry per 32 bytes is waste)


def n_chunks(size: int, chunk_bytes: int) -> int:
    """How many chunks a payload of `size` bytes travels in."""
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be >= 1")
    return max(1, -(-size // chunk_bytes))


def chunk(payload: bytes | memoryview, chunk_bytes: int, index: int) -> memoryview:
    """Chunk `index` of `payload` (a view, nothing copied)."""
    view = memoryview(payload)
    return view[index * chunk_bytes:(index + 1) * chunk_bytes]


def chunks(payload: bytes | memoryview, chunk_bytes: int, start: int = 0
           ) -> Iterator[tuple[int, memoryview]]:
    """(index, chunk) from `start` to the last."""
    for i in range(start, n_chunks(len(payload), chunk_bytes)):
        yield i, chunk(payload, chunk_bytes, i)


def manifest(payload: bytes | memoryview, chunk_bytes: int) -> bytes:
    """The concatenated SHA-256 of every chunk of `payload`."""
    return b"".join(hashlib.sha256(c).digest() for _, c in chunks(payload, chunk_bytes))


def check_manifest(man: bytes, size: int, chunk_bytes: int) -> None:
    """Raises BadChunk (field manifest) unless `man` has one entry per chunk."""
    want = n_chunks(size, chunk_bytes) * DIGEST_LEN
    if len(man) != want:
        raise BadChunk(f"manifest is {len(man)} bytes; {size} bytes in chunks of {chunk_bytes} "
                       f"need {want}", field="manifest")


class Reassembly:
    """The receiver's progress on one streamed payload (see the module doc)."""

    def __init__(self, *, size: int, chunk_bytes: int, manifest: bytes,
                 sink: Callable[[int, bytes | memoryview], None],
                 window: int = DEFAULT_WINDOW) -> None:
        check_manifest(manifest, size, chunk_bytes)
        if window < 1:
            raise ValueError("window must be >= 1")
        self.size, self.chunk_bytes, self.manifest = size, chunk_bytes, manifest
        self.n = n_chunks(size, chunk_bytes)
        self.sink, self.window = sink, window
        self.next = 0  # every chunk below it is verified and written
        self.ahead: set[int] = set()  # verified chunks at or above `next` + 1
        self.verified_bytes = 0

    @property
    def complete(self) -> bool:
        return self.next == self.n

    def expected_len(self, index: int) -> int:
        return min(self.chunk_bytes, self.size - index * self.chunk_bytes)

    def check(self, index: int, data: bytes | memoryview) -> None:
        """Raises the typed refusal of chunk `index`, or returns when it may be taken.
        Changes nothing."""
        if not 0 <= index < self.n:
            raise BadChunk(f"chunk {index} out of range: the transfer has {self.n} chunks",
                           field="index")
        if index < self.next or index in self.ahead:
            raise DuplicateChunk(f"chunk {index} was already received", field="index")
        if index >= self.next + self.window:
            raise ChunkOutOfWindow(f"chunk {index} is beyond the window: chunks "
                                   f"{self.next}..{self.next + self.window - 1} are taken now",
                                   field="index")
        want = self.expected_len(index)
        if len(data) != want:
            raise BadChunk(f"chunk {index} is {len(data)} bytes, the manifest's is {want}",
                           field="payload")
        entry = self.manifest[index * DIGEST_LEN:(index + 1) * DIGEST_LEN]
        if hashlib.sha256(data).digest() != entry:
            raise BadChunk(f"chunk {index}: SHA-256 is not the manifest's", field="payload")

    def accept(self, index: int, data: bytes | memoryview) -> None:
        """Verify chunk `index` and hand it to the sink; a refusal (typed error) leaves the
        progress untouched and writes nothing."""
        self.check(index, data)
        self.sink(index * self.chunk_bytes, data)
        self.verified_bytes += len(data)
        self.ahead.add(index)
        while self.next in self.ahead:
            self.ahead.discard(self.next)
            self.next += 1

    def resume(self) -> int:
        """Where a resumed transfer starts: the first chunk not verified. Chunks verified
        beyond it are forgotten (they will be sent again, in order)."""
        for i in self.ahead:
            self.verified_bytes -= self.expected_len(i)
        self.ahead.clear()
        return self.next
