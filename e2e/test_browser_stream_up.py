"""A tab in a streaming run (stream_chunk_mb) uploads its updates in chunks: the server's page
in Chromium trains, its participant's Submit (larger than a chunk) goes as a signed
StreamSubmit and, after the server's Resume, as Chunk frames (shared.stream_up.Sender, driven
from browser/node/node_glue.py), each checked on arrival and spooled by server.streams.

The server closes the tab's socket right after it verified the first two chunks of round 0's
update (the chunks the tab had already sent after them are lost with the socket): the tab
reconnects, resubmits, the server answers Resume at chunk 2 and only the rest travels. Every
round commits with the tab's update; no chunk reaches the intake twice, none is refused, and
the page logs no error. The tab sends the chunks one at a time, each once its socket's buffer
holds less than a chunk (browser/node/stream_pump.js): its own counters show at most 2 chunk
frames queued. (Star runs, over the tab's data channel: test_browser_stream_rtc.py.)"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from server.keys import COORDINATOR

CHUNK_MB = 0.05
CUT_AFTER = 2  # chunks of round 0's update the server verifies before it cuts the socket
ROUNDS = 2
RUN: dict[str, object] = {
    "model": "gpt-tiny", "inner_steps": 8, "batch_size": 16, "deadline_s": 120.0, "quorum": 1,
    "rounds": ROUNDS, "codec": "raw32", "stream_chunk_mb": CHUNK_MB}


def api(server: Any, path: str) -> Any:
    with urllib.request.urlopen(f"{server.url}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def test_a_tab_streams_its_updates_and_resumes_after_a_cut(make_server: Any,
                                                           open_tab: Any) -> None:
    server = make_server(RUN)
    coord = server.call(lambda: server.runner.app[COORDINATOR])
    intake = coord.streams
    seen: dict[str, Any] = {"chunks": 0, "cut": None}
    take = intake.on_chunk

    async def on_chunk(conn: Any, frame: Any) -> None:  # the intake, then maybe the cut
        seen["chunks"] += 1
        await take(conn, frame)
        t = intake.transfers.get(conn.peer.node_id) if conn.peer is not None else None
        if seen["cut"] is None and t is not None and t.reassembly.next == CUT_AFTER:
            seen["cut"] = (t.msg.round, t.reassembly.n)
            await conn.ws.close()  # the rest of this socket's frames are never read

    server.call(lambda: setattr(intake, "on_chunk", on_chunk))
    tab = open_tab(f"{server.url}/?backend=wasm", "tab")
    tab.wait("s.state === 'the run is finished'", timeout_s=240)
    s = tab.stats()
    assert s["accepted"] == ROUNDS, s
    assert s["rejected"] == 0, s
    assert s["resubmitted"] >= 1, s  # after the cut
    cut_round, n = seen["cut"]
    assert cut_round == 0
    update_bytes = 4 * server.run.n_params + 1  # raw32: a tag byte and the float32 values
    assert n == -(-update_bytes // int(CHUNK_MB * 2**20))
    assert n > CUT_AFTER + 1
    counters = server.call(lambda: dict(coord.counters))
    # every round's update came streamed; the cut one resumed once, at chunk CUT_AFTER
    assert counters["stream_started"] == ROUNDS, counters
    assert counters["stream_completed"] == ROUNDS, counters
    assert counters["stream_resumed"] == 1, counters
    # the verified chunks did not travel again: n chunks per round reached the intake
    assert seen["chunks"] == ROUNDS * n, seen
    rejected = server.call(lambda: dict(coord.rejected))
    assert not any(rejected.get(code) for code in
                   ("bad_chunk", "duplicate_chunk", "chunk_out_of_window", "foreign_chunk"))
    rounds = api(server, "/api/rounds")
    assert [r["n_updates"] for r in rounds] == [1] * ROUNDS, rounds
    for r in range(ROUNDS):
        assert s["nodeId"] in server.call(lambda r=r: server.run.store.update_keys(r))
    assert not list((server.data_dir / "spool").iterdir())  # nothing left after the commits
    # the tab's memory for its update's frames is bounded by chunks: at most 2 chunk frames
    # (and their bytes) ever sat in its socket's buffer; the old code queued all 9 at once
    st = s["stream"]
    frame_bytes = int(CHUNK_MB * 2**20) + 512  # a Chunk frame: header + one chunk
    assert 1 <= st["maxQueuedFrames"] <= 2, st
    assert st["maxQueuedBytes"] <= 2 * frame_bytes, st
    assert st["resumes"] == 1, st
    assert st["submits_rtc"] == st["chunks_rtc"] == 0, st
    assert st["chunks_ws"] >= ROUNDS * n, st  # (and those lost with the cut)
    assert tab.errors == [], tab.errors

