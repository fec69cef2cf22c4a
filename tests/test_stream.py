"""shared.stream: chunking, manifests, verification, resume and every refused chunk."""

from __future__ import annotations

import hashlib
import os

import pytest

from shared.errors import BadChunk, BadUpdate, ChunkOutOfWindow, DuplicateChunk
from shared.stream import (
    DIGEST_LEN,
    Reassembly,
    check_manifest,
    chunk,
    chunks,
    manifest,
    n_chunks,
)

PAYLOAD = os.urandom(10_000)
CB = 1024


class Sink:
    """A bytearray the size of the payload, and the writes it got."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.writes = 0

    def __call__(self, offset: int, data: bytes | memoryview) -> None:
        self.buf[offset:offset + len(data)] = data
        self.writes += 1


def fresh(window: int = 4) -> tuple[Reassembly, Sink]:
    sink = Sink(len(PAYLOAD))
    return Reassembly(size=len(PAYLOAD), chunk_bytes=CB, manifest=manifest(PAYLOAD, CB),
                      sink=sink, window=window), sink


def state(r: Reassembly) -> tuple[int, frozenset[int], int]:
    return r.next, frozenset(r.ahead), r.verified_bytes


def test_chunks_cover_the_payload_and_the_manifest_lists_each() -> None:
    assert n_chunks(len(PAYLOAD), CB) == 10
    assert n_chunks(1, CB) == 1
    assert n_chunks(CB, CB) == 1
    parts = list(chunks(PAYLOAD, CB))
    assert b"".join(bytes(c) for _, c in parts) == PAYLOAD
    assert [len(c) for _, c in parts][-1] == 10_000 - 9 * CB
    man = manifest(PAYLOAD, CB)
    assert len(man) == 10 * DIGEST_LEN
    assert man[3 * 32:4 * 32] == hashlib.sha256(PAYLOAD[3 * CB:4 * CB]).digest()
    check_manifest(man, len(PAYLOAD), CB)
    with pytest.raises(BadChunk):
        check_manifest(man[:-1], len(PAYLOAD), CB)


def test_in_order_and_within_window_out_of_order_reassemble_exactly() -> None:
    r, sink = fresh()
    order = [1, 0, 3, 2, 4, 6, 5, 7, 9, 8]
    for i in order:
        assert not r.complete
        r.accept(i, chunk(PAYLOAD, CB, i))
    assert r.complete
    assert bytes(sink.buf) == PAYLOAD
    assert r.verified_bytes == len(PAYLOAD)


@pytest.mark.parametrize("case", ["tampered", "short", "past_end", "duplicate_prefix",
                                  "duplicate_ahead", "beyond_window", "other_update"])
def test_every_bad_chunk_is_refused_typed_and_changes_nothing(case: str) -> None:
    r, sink = fresh(window=4)
    r.accept(0, chunk(PAYLOAD, CB, 0))
    r.accept(2, chunk(PAYLOAD, CB, 2))
    before, writes = state(r), sink.writes
    snapshot = bytes(sink.buf)
    other = os.urandom(len(PAYLOAD))
    index, data, err = {
        "tampered": (1, bytes([chunk(PAYLOAD, CB, 1)[0] ^ 1]) + bytes(chunk(PAYLOAD, CB, 1)[1:]),
                     BadChunk),
        "short": (1, bytes(chunk(PAYLOAD, CB, 1))[:-1], BadChunk),
        "past_end": (10, b"x", BadChunk),
        "duplicate_prefix": (0, bytes(chunk(PAYLOAD, CB, 0)), DuplicateChunk),
        "duplicate_ahead": (2, bytes(chunk(PAYLOAD, CB, 2)), DuplicateChunk),
        "beyond_window": (5, bytes(chunk(PAYLOAD, CB, 5)), ChunkOutOfWindow),
        "other_update": (1, bytes(chunk(other, CB, 1)), BadChunk),
    }[case]
    with pytest.raises(err) as info:
        r.accept(index, data)
    assert type(info.value) is err
    assert isinstance(info.value, BadUpdate)
    assert state(r) == before
    assert sink.writes == writes
    assert bytes(sink.buf) == snapshot
    # the transfer still completes with the right chunks
    for i in range(10):
        if i not in (0, 2):
            r.accept(i, chunk(PAYLOAD, CB, i))
    assert r.complete
    assert bytes(sink.buf) == PAYLOAD


def test_error_codes_are_distinct() -> None:
    codes = {BadChunk.code, DuplicateChunk.code, ChunkOutOfWindow.code}
    assert codes == {"bad_chunk", "duplicate_chunk", "chunk_out_of_window"}


def test_resume_restarts_after_the_last_verified_prefix_chunk() -> None:
    r, sink = fresh(window=4)
    for i in (0, 1, 3):
        r.accept(i, chunk(PAYLOAD, CB, i))
    assert r.resume() == 2
    assert r.ahead == set()
    assert r.verified_bytes == 2 * CB
    for i in range(2, 10):  # the sender resends in order from 2, 3 included
        r.accept(i, chunk(PAYLOAD, CB, i))
    assert r.complete
    assert bytes(sink.buf) == PAYLOAD
