"""Data-channel chunking (shared.rtc): round trips, limits, and only typed errors on bad input."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import FrameError, FrameTooLarge, ProtocolError
from shared.rtc import CHUNK_DATA, HEADER, MAX_MESSAGE, Reassembler, cancel_chunk, chunks


@pytest.mark.parametrize("size", [0, 1, CHUNK_DATA - 1, CHUNK_DATA, CHUNK_DATA + 1,
                                  3 * CHUNK_DATA + 17])
def test_round_trip_and_chunk_sizes(size: int) -> None:
    frame = os.urandom(size)
    parts = list(chunks(frame, 7))
    assert all(len(p) <= MAX_MESSAGE for p in parts)
    assert len(parts) == max(1, -(-size // CHUNK_DATA))
    r = Reassembler()
    out = [r.feed(p) for p in parts]
    assert out[:-1] == [None] * (len(parts) - 1)
    assert out[-1] == frame
    assert r.open == {}


def test_interleaved_transfers_and_cancel() -> None:
    a, b = os.urandom(2 * CHUNK_DATA + 5), os.urandom(CHUNK_DATA + 1)
    pa, pb = list(chunks(a, 1)), list(chunks(b, 2))
    r = Reassembler()
    assert r.feed(pa[0]) is None
    assert r.feed(pb[0]) is None
    assert r.feed(pb[1]) == b
    assert r.feed(cancel_chunk(1)) is None
    assert r.cancelled == 1
    with pytest.raises(FrameError, match="before chunk 0"):
        r.feed(pa[1])  # the cancelled transfer is gone


def test_digest_is_checked() -> None:
    frame = os.urandom(CHUNK_DATA + 10)
    parts = list(chunks(frame, 3))
    bad = bytearray(parts[1])
    bad[-1] ^= 1
    r = Reassembler()
    r.feed(parts[0])
    with pytest.raises(FrameError, match="digest"):
        r.feed(bytes(bad))
    assert r.open == {}  # forgotten; the channel goes on
    assert r.feed(next(chunks(b"ok", 4))) == b"ok"


def test_limits() -> None:
    r = Reassembler(max_frame=1000, max_transfers=1)
    with pytest.raises(FrameTooLarge):
        r.feed(next(chunks(os.urandom(1001), 1)))
    r = Reassembler(max_transfers=1)
    r.feed(next(chunks(os.urandom(CHUNK_DATA + 1), 2)))
    with pytest.raises(FrameError, match="in flight"):
        r.feed(next(chunks(os.urandom(CHUNK_DATA + 1), 3)))
    with pytest.raises(FrameTooLarge):
        r.feed(b"\x00" * (MAX_MESSAGE + 1))
    with pytest.raises(FrameError):
        r.feed(b"\x00" * (HEADER.size - 1))


def test_out_of_order_and_inconsistent_chunks() -> None:
    parts = list(chunks(os.urandom(3 * CHUNK_DATA), 9))
    r = Reassembler()
    r.feed(parts[0])
    with pytest.raises(FrameError, match="does not follow"):
        r.feed(parts[2])
    r = Reassembler()
    with pytest.raises(FrameError, match="before chunk 0"):
        r.feed(parts[1])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_random_bytes_only_raise_typed_errors(blobs: list[bytes]) -> None:
    r = Reassembler(max_frame=10_000)
    for blob in blobs:
        with contextlib.suppress(ProtocolError):
            r.feed(blob)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=2000), st.integers(0, 1999), st.integers(0, 255))
def test_mutated_chunks_only_raise_typed_errors(frame: bytes, pos: int, value: int) -> None:
    parts = [bytearray(p) for p in chunks(frame, 5, chunk_data=300)]
    flat = [i for i, p in enumerate(parts) for _ in p]
    which = flat[pos % len(flat)]
    offset = pos % len(parts[which])
    parts[which][offset] = value
    r = Reassembler(max_frame=10_000)
    out = None
    try:
        for p in parts:
            out = r.feed(bytes(p)) or out
    except ProtocolError:
        return
    assert out is None or out == frame or len(out) == len(frame)
