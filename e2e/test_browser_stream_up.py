"""A tab in a streaming run (stream_chunk_mb) uploads its updates in chunks: the server's page
in Chromium trains, its participant's Submit (larger than a chunk) goes as a signed
StreamSubmit and, after the server's Resume, as Chunk frames (shared.stream_up.Sender, driven
from browser/node/node_glue.py), each checked on arrival and spooled by server.streams.

The server closes the tab's socket right after it verified the first two chunks of round 0's
update (the chunks the tab had already sent after them are lost with the socket): the tab
reconnects, resubmits, the server answers Resume at chunk 2 and only the rest travels. Every
round commits with the tab's update; no chunk reaches the intake twice, none is refused, and
the page logs no error. In a star run the tab streams on its WebSocket, its data channel open."""

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
    assert tab.errors == [], tab.errors


def test_a_tab_in_a_star_run_streams_on_its_websocket(make_server: Any, open_tab: Any) -> None:
    """In a star run the tab's streamed update goes on its WebSocket (node.js puts only a
    one-frame Submit on its data channel): every frame of it counts on the `_ws` path."""
    server = make_server({**RUN, "transport": "star"})
    tab = open_tab(f"{server.url}/?backend=wasm", "star-tab")
    tab.wait("s.transport === 'webrtc'", timeout_s=240)  # its data channel is open
    tab.wait("s.state === 'the run is finished'", timeout_s=240)
    s = tab.stats()
    assert s["accepted"] == ROUNDS, s
    assert s["rejected"] == 0, s
    view = api(server, "/api/run")["stream"]
    n = -(-(4 * server.run.n_params + 1) // int(CHUNK_MB * 2**20))
    assert view["completed"] == ROUNDS, view
    assert (view["submits_ws"], view["chunks_ws"]) == (ROUNDS, ROUNDS * n), view
    assert view.get("submits_rtc", 0) == view.get("chunks_rtc", 0) == 0, view
    assert [r["n_updates"] for r in api(server, "/api/rounds")] == [1] * ROUNDS
    assert tab.errors == [], tab.errors
