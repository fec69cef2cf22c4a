"""The sans-I/O update sender (shared.stream_up.Sender, which the native node and the tab
drive) with the real Participant against a real server on loopback: a Submit larger than
the Welcome's stream_chunk becomes a signed StreamSubmit; the server's Resume gives the Chunk
frames; a socket cut after two chunks, the participant's resubmission after the reconnect
is streamed again and the server resumes at chunk 2, only the rest travels, and the round
commits the update. A Resume that is forged, for another update, or with none in flight is
ignored and counted; small Submits and other events pass as they are."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import numpy as np

from server.keys import COORDINATOR
from shared.envelope import Identity
from shared.messages import Resume, StreamSubmit, Submit, decode_message
from shared.participant import Event, Participant
from shared.stream import n_chunks
from shared.stream_up import Sender
from tests.test_ws_protocol import identity, serve

CB = 1024
CHUNK_MB = CB / 2**20


async def drive(ws: Any, part: Participant, snd: Sender, want: str) -> Any:
    """Feed server frames to the participant, carry out its sends (streamed where the
    sender wants), until an event of kind `want`, or a Resume frame (want "resume")."""
    while True:
        raw = await ws.receive(timeout=20)
        assert raw.type == aiohttp.WSMsgType.BINARY, raw
        if raw.data[5] == Resume.TYPE:
            if want == "resume":
                return raw.data
            continue
        for ev in snd.stream(part.receive(raw.data)):
            if ev["kind"] == "send":
                await ws.send_bytes(ev["frame"])
            if ev["kind"] == want:
                return ev
            assert ev["kind"] not in ("fatal", "refused", "error"), ev


def submit(part: Participant, train: Event) -> list[Event]:
    delta = np.full(len(train["params"]) // 4, 1e-3, np.float32)
    return part.submit(train["round"], delta.tobytes(), train_loss=1.0, samples=8,
                       compute_s=0.1)


async def test_streamed_update_resumes_after_a_cut_and_commits(tmp_path: Any) -> None:
    async with serve(tmp_path, quorum=1, stream_chunk_mb=CHUNK_MB, codec="raw32",
                     deadline_s=60.0, rounds=2) as srv:
        coord = srv.app[COORDINATOR]
        intake = coord.streams
        assert intake is not None
        part = Participant(identity("up"), runtime="native", agent="test", device="cpu")
        snd = Sender(part)
        async with srv.http.ws_connect(srv.url + "/ws") as ws:
            part.connection_made()
            train = await drive(ws, part, snd, "train")
            events = submit(part, train)
            sub = next(e for e in events if e["kind"] == "send")
            assert sub["msg_type"] == Submit.TYPE
            assert snd.wants(sub["frame"])
            out = snd.stream(events)
            assert [e["kind"] for e in out] == [e["kind"] for e in events]  # journal kept
            ann = next(e for e in out if e["kind"] == "send")
            assert ann["msg_type"] == StreamSubmit.TYPE
            msg = decode_message(ann["frame"])
            assert isinstance(msg, StreamSubmit)
            pending = part.pending
            assert isinstance(pending, Submit)  # (a tab's: never spooled)
            assert (msg.digest, msg.size, msg.chunk_bytes) == (pending.digest,
                                                               len(pending.payload), CB)
            n = n_chunks(msg.size, CB)
            assert n > 16  # more chunks than the server's window
            assert len(msg.payload) == 32 * n
            await ws.send_bytes(ann["frame"])
            frames = snd.on_resume(await drive(ws, part, snd, "resume"))
            assert frames is not None
            for _ in range(2):
                await ws.send_bytes(next(frames))
            for _ in range(100):  # the server verified both before the cut
                t = intake.transfers.get(part.node_id)
                if t is not None and t.reassembly.next == 2:
                    break
                await asyncio.sleep(0.02)
            assert intake.transfers[part.node_id].reassembly.next == 2
        async with srv.http.ws_connect(srv.url + "/ws") as ws:  # the reconnect
            part.connection_made()
            resume = await drive(ws, part, snd, "resume")  # resubmitted, streamed again
            assert decode_message(resume).next == 2  # type: ignore[attr-defined]
            frames = snd.on_resume(resume)
            assert frames is not None
            rest = list(frames)
            assert len(rest) == n - 2  # only the chunks not verified travel again
            for f in rest:
                await ws.send_bytes(f)
            ack = await drive(ws, part, snd, "ack")
            assert (ack["status"], ack["digest"]) == ("accepted", pending.digest)
            committed = await drive(ws, part, snd, "committed")
            assert committed["round"] == train["round"]
        assert snd.counts == {"started": 2, "resumed": 1}
        assert coord.counters["stream_resumed"] == 1
        assert coord.counters["stream_completed"] == 1
        assert coord.counters.get("stream_started") == 1


async def test_resumes_that_do_not_fit_are_ignored_and_small_submits_pass(
        tmp_path: Any) -> None:
    async with serve(tmp_path, quorum=1, stream_chunk_mb=CHUNK_MB, codec="raw32",
                     deadline_s=60.0) as srv:
        part = Participant(identity("up2"), runtime="native", agent="test", device="cpu")
        snd = Sender(part)
        async with srv.http.ws_connect(srv.url + "/ws") as ws:
            part.connection_made()
            train = await drive(ws, part, snd, "train")
            events = submit(part, train)
            welcome = part.welcome
            assert welcome is not None
            pending = part.pending
            assert pending is not None

            def resume(digest: str) -> bytes:  # signed, by a key that is not the server's
                forger = Identity.generate()
                msg = Resume(round=train["round"], digest=digest, next=0)
                return msg.to_frame(sign=forger.signer(
                    run_id=welcome.run_id, round_=msg.round, msg_type=Resume.TYPE,
                    nonce=msg.nonce))

            # the server's real Resume for another update (announced by hand): ignored while
            # none is in flight, and while ours is
            other = StreamSubmit(run_id=welcome.run_id, round=train["round"],
                                 node_id=part.node_id, codec="raw32", length=pending.length,
                                 digest="ab" * 32, size=CB, chunk_bytes=CB, train_loss=None,
                                 samples=1, compute_s=0.0, payload=b"\x00" * 32)
            await ws.send_bytes(part.frame(other))
            assert snd.on_resume(await drive(ws, part, snd, "resume")) is None
            snd.stream(events)
            cur = snd.current
            assert cur is not None
            assert cur.digest == pending.digest
            await ws.send_bytes(part.frame(other))
            assert snd.on_resume(await drive(ws, part, snd, "resume")) is None
            assert snd.on_resume(resume(pending.digest)) is None  # not the server's key
            assert snd.on_resume(Resume(round=0, digest=pending.digest, next=0).to_frame()) \
                is None  # unsigned
            assert snd.counts["ignored_resumes"] == 4
            assert snd.current is cur  # nothing ignored changed the update in flight
        small = {"kind": "send", "msg_type": Submit.TYPE, "frame": b"x" * CB}
        other_ev = {"kind": "send", "msg_type": 99, "frame": b"y" * (4 * CB)}
        assert snd.stream([small, other_ev]) == [small, other_ev]  # not larger / not a Submit
        part.welcome = None
        assert not snd.wants(b"z" * (4 * CB))  # no Welcome: nothing streams
