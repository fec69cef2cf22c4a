"""The participant's chunked Submit (shared.chunk_submit) against its one-shot Submit: two
participants get the same rounds and the same pseudo-gradients, one as bytes, one as a chunk
source with a spool; the updates (digest, payload, manifest, the chunks the Sender sends)
and the residuals are the same, round after round; NaN is the same refusal."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared import chunk_encode
from shared.chunk_encode import FileSpool, Spooled
from shared.messages import Chunk, Resume, StreamSubmit, Submit, decode_message
from shared.participant import Participant
from shared.stream import manifest
from shared.stream_up import Sender
from tests.test_chunk_encode import ArraySource
from tests.test_participant import (
    challenge,
    digest,
    kinds,
    participant,
    round_open,
    sent,
    signed,
    welcome,
)

N = 20_000
CHUNK = 1024  # the run's stream_chunk (bytes)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunk_encode, "COORDS", 3000)


def joined(p: Participant, **kw: Any) -> Participant:
    p.receive(signed(challenge()))
    w = dataclasses.replace(welcome(n_params=N, **kw), stream_chunk=CHUNK)
    assert kinds(p.receive(signed(w))) == ["welcome"]
    return p


def pair(tmp_path: Path, **kw: Any) -> tuple[Participant, Participant]:
    one, chunked = joined(participant(), **kw), joined(participant(), **kw)
    files = iter(range(1000))
    chunked.spool = lambda: FileSpool(str(tmp_path / f"u{next(files)}.spool"))
    return one, chunked


def theta(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(N).astype(np.float32)


def chunk_frames(p: Participant, sender: Sender, rnd: int, dig: str) -> list[bytes]:
    frames = sender.on_resume(signed(Resume(round=rnd, digest=dig, next=0)))
    assert frames is not None
    out = []
    for f in frames:
        msg = decode_message(f)
        assert isinstance(msg, Chunk)
        out.append(msg.payload)
    return out


@pytest.mark.parametrize(("codec", "params"), [
    ("int8-block", {}), ("topk", {"fraction": 0.05, "values": "int2"}), ("fp16", {}),
    ("raw32", {})])
def test_chunked_submit_equals_the_one_shot_submit_over_two_rounds(
        codec: str, params: dict[str, Any], tmp_path: Path) -> None:
    one, chunked = pair(tmp_path, codec=codec, codec_params=params, error_feedback=True)
    for rnd in range(2):
        base = theta(rnd)
        for p in (one, chunked):
            assert kinds(p.receive(signed(round_open(rnd, base))))[-1] == "train"
        delta = (0.01 * theta(10 + rnd)).astype(np.float32)
        ev_one = one.submit(rnd, delta.tobytes(), train_loss=0.5, samples=32, compute_s=1.0)
        src = ArraySource(delta)
        ev_chunked = chunked.submit(rnd, src, train_loss=0.5, samples=32, compute_s=1.0)
        assert src.reads > 1  # Δ came a chunk at a time
        assert kinds(ev_one) == ["journal", "send"]
        assert kinds(ev_chunked) == ["journal", "stream"]
        want = sent(ev_one[1])
        assert isinstance(want, Submit)
        up = ev_chunked[1]["update"]
        assert isinstance(up, Spooled)
        assert (up.digest, up.size, up.codec, up.length) == (want.digest, len(want.payload),
                                                             want.codec, want.length)
        assert up.manifest == manifest(want.payload, CHUNK)
        assert up.spool.read_at(0, up.size) == want.payload
        # the Sender announces it and sends the chunks read from the spool
        sender = Sender(chunked)
        announce = sent(sender.start_spooled(up))
        assert isinstance(announce, StreamSubmit)
        assert (announce.digest, announce.size, announce.payload) == (
            want.digest, len(want.payload), up.manifest)
        assert b"".join(chunk_frames(chunked, sender, rnd, up.digest)) == want.payload
        ref = Sender(one)
        ref.start(ev_one[1]["frame"])
        assert chunk_frames(one, sender, rnd, up.digest) == chunk_frames(one, ref, rnd,
                                                                         want.digest)
        # the same residual carried to the next round
        if one.residual is None:
            assert chunked.residual is None
        else:
            assert np.array_equal(np.asarray(one.residual).view(np.uint32),
                                  np.asarray(chunked.residual).view(np.uint32))
    assert chunked.counts["chunk_encoded"] == 2
    assert codec == "raw32" or one.residual is not None


def test_nan_is_the_same_refusal_and_leaves_the_residual(tmp_path: Path) -> None:
    one, chunked = pair(tmp_path, codec="int8-block", error_feedback=True)
    results = []
    for p in (one, chunked):
        p.receive(signed(round_open(0, theta(0))))
        p.residual = np.full(N, 0.5, dtype=np.float32)
        delta = np.ones(N, dtype=np.float32)
        delta[N - 3] = np.nan
        results.append(p.submit(0, delta.tobytes() if p is one else ArraySource(delta),
                                train_loss=0.5, samples=1, compute_s=1.0))
        assert p.training is None
        assert np.array_equal(p.residual, np.full(N, 0.5, dtype=np.float32))
    assert results[0] == results[1]
    assert results[0][0]["code"] == "not_finite"
    assert list(tmp_path.iterdir()) == []  # nothing was spooled


def test_a_spooled_update_is_journaled_and_resubmitted_from_its_spool(tmp_path: Path) -> None:
    _, p = pair(tmp_path, codec="fp16")
    p.receive(signed(round_open(0, theta(0))))
    ev = p.submit(0, ArraySource(0.1 * theta(3)), train_loss=None, samples=1, compute_s=1.0)
    up = ev[1]["update"]
    entry = p.journal_entry()
    assert entry is not None
    assert str(up.digest) in entry
    assert up.spool.path in entry
    again = joined(participant())  # a restarted node
    assert again.restore(entry)
    events = again.receive(signed(round_open(0, theta(0), attempt=1)))
    assert kinds(events) == ["resubmit", "stream"]
    assert events[1]["update"].digest == up.digest
    assert events[1]["update"].spool.read_at(0, up.size) == up.spool.read_at(0, up.size)
    with open(up.spool.path, "r+b") as f:  # a changed spool is not taken back
        f.write(b"\xff")
    assert not joined(participant()).restore(entry)
    Path(up.spool.path).unlink()
    assert not joined(participant()).restore(entry)


def test_what_keeps_the_one_shot_path(tmp_path: Path) -> None:
    for kw in ({"codec": "powersgd", "codec_params": {"rank": 2}},
               {"codec": "int8-block", "worker_momentum": 0.9},
               {"codec": "int8-block", "transport": "p2p"}):
        _, p = pair(tmp_path, **kw)
        p.layout = None
        p.receive(signed(round_open(0, theta(0))))
        if kw["codec"] == "powersgd":  # needs a layout: a square-ish one for the toy
            from shared.layout import make_manifest
            p.layout = make_manifest([("w", (100, 200), 0, N)])
        ev = p.submit(0, ArraySource(0.1 * theta(3)), train_loss=None, samples=1,
                      compute_s=1.0)
        assert "send" in kinds(ev), kw  # (p2p: "ready" first, its Δ for the shards)
        assert "stream" not in kinds(ev), kw
        assert "chunk_encoded" not in p.counts
    # a payload within one chunk goes as a plain Submit, the same as the one-shot one
    one, p = pair(tmp_path, codec="topk", codec_params={"fraction": 0.01})
    for q in (one, p):
        q.receive(signed(round_open(0, theta(0))))
    delta = 0.1 * theta(4)
    a = one.submit(0, delta.tobytes(), train_loss=None, samples=1, compute_s=1.0)
    b = p.submit(0, ArraySource(delta), train_loss=None, samples=1, compute_s=1.0)
    assert kinds(b) == ["journal", "send"]
    msg_a, msg_b = sent(a[1]), sent(b[1])
    assert isinstance(msg_a, Submit)
    assert isinstance(msg_b, Submit)
    assert (msg_b.digest, msg_b.payload) == (msg_a.digest, msg_a.payload)
    assert p.counts["chunk_encoded"] == 1
    # a star run's update is encoded by chunks too (its channel sender reads the spool)
    one, p = pair(tmp_path, codec="int8-block", transport="star")
    for q in (one, p):
        q.receive(signed(round_open(0, theta(0))))
    a = one.submit(0, delta.tobytes(), train_loss=None, samples=1, compute_s=1.0)
    b = p.submit(0, ArraySource(delta), train_loss=None, samples=1, compute_s=1.0)
    assert kinds(b) == ["journal", "stream"]
    want = sent(a[1])
    assert isinstance(want, Submit)
    assert b[1]["update"].spool.read_at(0, len(want.payload)) == want.payload
    assert b[1]["update"].digest == want.digest
    assert digest(theta(0))  # (the helper's params digest: the rounds above used it)


class FullSpool(FileSpool):
    """A spool on a full disk: writes fail."""

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        raise OSError(28, "No space left on device")


def test_a_spool_that_fails_never_sends_a_wrong_update(tmp_path: Path) -> None:
    one, p = pair(tmp_path, codec="int8-block", error_feedback=True)

    def no_spool() -> FileSpool:
        raise OSError(13, "Permission denied")

    p.spool = no_spool  # no file can be made: the one-shot path, the same update
    for q in (one, p):
        q.receive(signed(round_open(0, theta(0))))
    delta = 0.1 * theta(4)
    a = one.submit(0, delta.tobytes(), train_loss=None, samples=1, compute_s=1.0)
    b = p.submit(0, ArraySource(delta), train_loss=None, samples=1, compute_s=1.0)
    assert kinds(b) == ["journal", "send"]
    msg_a, msg_b = sent(a[1]), sent(b[1])
    assert isinstance(msg_a, Submit)
    assert isinstance(msg_b, Submit)
    assert msg_b.digest == msg_a.digest
    assert p.counts["chunk_spool_failed"] == 1
    p.spool = lambda: FullSpool(str(tmp_path / "full.spool"))  # writes fail mid-encoding
    p.receive(signed(round_open(1, theta(1))))
    ev = p.submit(1, ArraySource(delta), train_loss=None, samples=1, compute_s=1.0)
    assert [e.get("code") for e in ev] == ["spool_failed"]
    assert p.residual is None  # partly written: dropped, as after a restart
    assert p.training is None
    assert not (tmp_path / "full.spool").exists()
