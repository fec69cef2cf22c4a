"""Streamed masked updates (secagg with stream_chunk_mb): the real coordinator
(server.streams + server.secagg_stream) and the one participant implementation with the
one streaming sender (shared.stream_up), over memory, plain and grouped; and a real run of
native nodes. The masked words join the sum chunk by
chunk; a transfer left unfinished, a bad chunk and a masked update whose words do not match
its signed header all leave the sum exact (the committed aggregate is the exact mean of the
updates that were taken), and the server holds no update."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.common import free_port, get_json
from bench.secagg_run import Live, Tamper, committed_as, live_run, until
from server.coordinator import Coordinator
from server.secagg_stream import MaskedStreams
from shared.frame import decode_frame
from shared.messages import (
    Chunk,
    Message,
    Resume,
    StreamSubmit,
    Submit,
    message_from_frame,
    sha256_hex,
)
from shared.secagg.round import pack_masked, unpack_masked
from shared.stream_up import Sender
from tests.conftest import Procs, wait_for

CHUNK_MB = 0.004  # ~4 KiB chunks: every mlp-digits masked update travels in several


class StreamLive(Live):
    """A Live participant whose Submit goes streamed (shared.stream_up.Sender), with hooks:
    `cut_after` chunks then it stops sending (a dropout mid-transfer), `corrupt` chunk
    indices sent once with a flipped byte before the good one."""

    def __init__(self, coord: Coordinator, tamper: Tamper | None = None) -> None:
        super().__init__(coord, tamper)
        self.sender = Sender(self.part)
        self.cut_after: int | None = None
        self.corrupt: set[int] = set()
        self.sent = 0
        self.streamed = 0

    async def pump(self) -> None:
        while self.inbox and not self.gone:
            data = self.inbox.pop(0)
            if data[5:6] == bytes((Resume.TYPE,)):
                for frame in self.sender.on_resume(data) or ():
                    await self._chunk(frame)
                continue
            for ev in self.part.receive(data):
                await self.on_event(ev)

    async def _chunk(self, frame: bytes) -> None:
        if self.gone or (self.cut_after is not None and self.sent >= self.cut_after):
            return
        msg = message_from_frame(decode_frame(frame), max_payload=1 << 28)
        assert isinstance(msg, Chunk)
        if msg.index in self.corrupt:
            self.corrupt.discard(msg.index)
            bad = bytearray(msg.payload)
            bad[0] ^= 1
            await self.coord.handle_frame(self.conn, dataclasses.replace(
                msg, payload=bytes(bad)).to_frame())
        self.sent += 1
        await self.coord.handle_frame(self.conn, frame)

    async def on_event(self, ev: dict[str, Any]) -> None:
        if ev["kind"] == "send" and ev["msg_type"] == Submit.TYPE:
            data = bytes(ev["frame"])
            if self.tamper is not None:
                msg = message_from_frame(decode_frame(data), max_payload=1 << 28)
                data = self.part.frame(self.tamper(self, msg))
            assert self.sender.wants(data)
            self.streamed += 1
            await self.coord.handle_frame(self.conn, self.sender.start(data)["frame"])
            return
        await super().on_event(ev)


@contextlib.asynccontextmanager
async def streaming_run(tmp_path: Path, nodes: int, tampers: dict[int, Tamper] | None = None,
                        **config: Any) -> AsyncIterator[tuple[Coordinator, list[StreamLive]]]:
    """bench.secagg_run.live_run with StreamLive participants and `stream_chunk_mb`."""
    import bench.secagg_run as sr

    orig = sr.Live
    sr.Live = StreamLive  # type: ignore[misc]  # live_run builds its participants by name
    try:
        async with live_run(tmp_path / "run", nodes, tampers, **{
                "stream_chunk_mb": CHUNK_MB, **config}) as (coord, lives):
            yield coord, [lv for lv in lives if isinstance(lv, StreamLive)]
    finally:
        sr.Live = orig  # type: ignore[misc]


@contextlib.asynccontextmanager
async def streamed_run(tmp_path: Path, nodes: int, tampers: dict[int, Tamper] | None = None,
                       **config: Any) -> AsyncIterator[tuple[Coordinator, list[StreamLive]]]:
    async with streaming_run(tmp_path, nodes, tampers, **{
            "secagg": True, "secagg_clip": 0.5, "secagg_timeout_s": 5.0, **config}) as out:
        yield out


def deltas(n: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.3, 0.3, n).astype(np.float32) for _ in range(count)]


def start_of(coord: Coordinator) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(coord.run.params).copy(), np.asarray(coord.run.momentum).copy()


def watcher(coord: Coordinator) -> MaskedStreams:
    assert coord.streams is not None
    w = coord.streams.watcher
    assert w is not None
    return w


async def keyed(coord: Coordinator, lives: list[StreamLive]) -> None:
    await until(lambda: all(lv.trains for lv in lives), "every node to get the round")
    await until(lambda: coord.status()["secagg"]["stage"] == "masking", "the keys")


@pytest.mark.parametrize("transport", ["ws", "star"])  # star: frames reach the same intake
async def test_masked_words_join_the_sum_as_chunks_arrive_and_the_mean_is_exact(
        tmp_path: Path, transport: str) -> None:
    async with streamed_run(tmp_path, 3, quorum=3, transport=transport) as (coord, lives):
        start = start_of(coord)
        ds = deltas(coord.run.n_params, 3, seed=1)
        await keyed(coord, lives)
        agg = coord.secagg.agg if coord.secagg is not None else None
        assert agg is not None
        lives[0].cut_after = 3  # hold its last chunks back: the first ones are in the sum
        await lives[0].train(ds[0])
        await until(lambda: lives[0].sent == 3, "3 chunks")
        assert watcher(coord).progress[lives[0].part.node_id].added > 0
        assert agg.sum.any()  # summed before the transfer completed
        assert agg.submitted == []
        lives[0].cut_after = None
        assert lives[0].sender.current is not None
        for frame in lives[0].sender.current.frames(lives[0].sent):
            await lives[0]._chunk(frame)
        await lives[1].train(ds[1])
        await lives[2].train(ds[2])
        await until(lambda: coord.run.version == 1, "the commit")
        assert all(lv.streamed == 1 and lv.errors == [] for lv in lives)
        assert committed_as(coord, start, [lv.plain[0] for lv in lives])
        assert coord.counters["stream_completed"] == 3
        assert coord.counters["secagg_rounds"] == 1
        assert sorted(coord.run.store.update_keys(0)) == sorted(lv.part.node_id
                                                                for lv in lives)


async def test_a_node_leaving_mid_transfer_and_a_bad_chunk_leave_the_sum_exact(
        tmp_path: Path) -> None:
    """Node 2 stops after 3 chunks (their words are in the sum) and leaves; node 1 sends a
    corrupted chunk first (refused, bad_chunk), then the good one. The round unmasks the two
    complete updates: the unfinished transfer's words come back out, exactly."""
    async with streamed_run(tmp_path, 3, quorum=2) as (coord, lives):
        start = start_of(coord)
        ds = deltas(coord.run.n_params, 3, seed=2)
        await keyed(coord, lives)
        lives[2].cut_after = 3
        await lives[2].train(ds[2])
        await until(lambda: lives[2].sent == 3, "3 chunks")
        assert watcher(coord).progress[lives[2].part.node_id].added > 0
        lives[2].leave()
        lives[1].corrupt = {1}
        await lives[1].train(ds[1])
        await until(lambda: ("bad_chunk" in [c for c, _ in lives[1].errors]), "the refusal")
        await lives[0].train(ds[0])
        await until(lambda: coord.run.version == 1, "the commit")
        last = coord.status()["secagg"]["last"]
        assert sorted(last["contributors"]) == sorted(lv.part.node_id for lv in lives[:2])
        assert committed_as(coord, start, [lv.plain[0] for lv in lives[:2]])
        assert coord.counters["secagg_stream_words_undone"] > 0
        assert coord.rejected["bad_chunk"] == 1


def _words_not_the_header(live: Live, msg: Message) -> Message:
    """A masked update whose words are not the ones its signed header hashes: the Submit and
    the stream's manifest are consistent (re-signed), only the header's SHA-256 disagrees."""
    if isinstance(msg, Submit):
        mu = unpack_masked(msg.payload)
        words = bytearray(mu.payload)
        words[-1] ^= 1
        payload = pack_masked(dataclasses.replace(mu, payload=bytes(words)))
        return dataclasses.replace(msg, payload=payload, digest=sha256_hex(payload))
    return msg


async def test_words_that_fail_their_header_are_taken_back_out_and_the_sender_excluded(
        tmp_path: Path) -> None:
    tampers: dict[int, Callable[[Live, Message], Message]] = {2: _words_not_the_header}
    async with streamed_run(tmp_path, 3, tampers, quorum=2) as (coord, lives):
        start = start_of(coord)
        ds = deltas(coord.run.n_params, 3, seed=3)
        await keyed(coord, lives)
        await lives[2].train(ds[2])
        await until(lambda: any(code == "secagg_bad_masked_update"
                                for code, _ in lives[2].errors), "the refusal")
        assert coord.secagg is not None
        assert coord.secagg.agg is not None
        assert coord.secagg.agg.excluded == {lives[2].part.node_id: "secagg_bad_masked_update"}
        for lv, d in zip(lives[:2], ds, strict=False):
            await lv.train(d)
        await until(lambda: coord.run.version == 1, "the commit")
        assert committed_as(coord, start, [lv.plain[0] for lv in lives[:2]])
        assert coord.counters["secagg_stream_words_undone"] == coord.run.n_params


async def test_a_stream_for_the_wrong_codec_or_stage_is_refused_before_any_chunk(
        tmp_path: Path) -> None:
    async with streamed_run(tmp_path, 2, quorum=2) as (coord, lives):
        await until(lambda: all(lv.trains for lv in lives), "the round")
        lv = lives[0]
        frame = lv.part.frame(StreamSubmit(
            run_id=coord.run.run_id, round=0, node_id=lv.part.node_id, codec="raw32",
            length=coord.run.n_params, digest="00" * 32, size=4 * coord.run.n_params,
            chunk_bytes=4096, train_loss=None, samples=0, compute_s=0.0,
            payload=b"\0" * 32 * -(-4 * coord.run.n_params // 4096)))
        await coord.handle_frame(lv.conn, frame)
        await until(lambda: bool(lv.errors), "the refusal")
        assert lv.errors[0][0] == "bad_update"
        assert "codec must be 'secagg'" in lv.errors[0][1]
        assert coord.streams is not None
        assert coord.streams.transfers == {}


def test_a_secagg_run_of_native_nodes_streams_its_masked_updates(procs: Procs,
                                                                 tmp_path: Path) -> None:
    """`python -m server --secagg --stream-chunk-mb 0.01` and three native nodes on loopback:
    every masked update travels in chunks, each round unmasks the sum of all three, and the
    spool keeps nothing of a committed round."""
    port, rounds, data = free_port(), 2, tmp_path / "run"
    base = f"http://127.0.0.1:{port}"
    procs.server("server", data, port, "--model", "mlp-digits", "--inner-steps", "5",
                 "--batch-size", "32", "--deadline-s", "60", "--quorum", "3", "--rounds",
                 str(rounds), "--secagg", "--secagg-clip", "0.5", "--secagg-timeout-s", "20",
                 "--stream-chunk-mb", "0.01")
    wait_for(lambda: get_json(base + "/api/run"), 30, "the server")
    for name in ("a", "b", "c"):
        procs.node(name, port)
    wait_for(lambda: get_json(base + "/api/run")["status"] == "finished", 150,
             f"the run to finish (logs in {tmp_path})")
    run = get_json(base + "/api/run")
    assert run["committed_rounds"] == rounds
    assert run["secagg"]["last"]["round"] == rounds - 1
    assert len(run["secagg"]["last"]["contributors"]) == 3
    assert run["stream"]["completed"] == 3 * rounds
    log = procs.log("server")
    sizes = [int(x) for x in re.findall(r"streamed update from \w+ for round \d+: (\d+) bytes",
                                        log)]
    assert len(sizes) == 3 * rounds, log[-3000:]
    assert min(sizes) > 2 * int(0.01 * 2**20)  # several chunks each
    assert log.count("complete (accepted)") == 3 * rounds
    assert list((data / "spool").iterdir()) == []


async def test_grouped_secagg_streams_into_each_groups_sum(tmp_path: Path) -> None:
    """secagg_groups 3, nine nodes: each masked update streams into its group's sum; one
    node stops mid-transfer and leaves, its words come back out of its group's sum, and the
    commit is the median of the exact group means of the updates that were taken."""
    from tests.test_secagg_groups_run import committed, group_means

    async with streamed_run(tmp_path, 9, quorum=8, secagg_groups=3,
                            aggregator="median") as (coord, lives):
        start = start_of(coord)
        await keyed(coord, lives)
        ds = deltas(coord.run.n_params, 9, seed=4)
        lives[0].cut_after = 3
        await lives[0].train(ds[0])
        await until(lambda: lives[0].sent == 3, "3 chunks")
        assert watcher(coord).progress[lives[0].part.node_id].added > 0
        lives[0].leave()
        for lv, d in zip(lives[1:], ds[1:], strict=True):
            await lv.train(d)
        await until(lambda: coord.run.version == 1, "the commit")
        gone = lives[0].part.node_id
        last = coord.status()["secagg"]["last"]
        assert all(gone not in g["contributors"] for g in last["groups"])
        others: list[Live] = list(lives[1:])
        means = group_means(coord, others)
        assert len(means) == 3
        assert committed(coord, start, np.median(np.stack(means), axis=0).astype(np.float32))
        assert coord.counters["secagg_stream_words_undone"] > 0
        assert coord.counters["stream_completed"] == 8
