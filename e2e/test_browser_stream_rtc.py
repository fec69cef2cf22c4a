"""A tab in a `star` run streams its updates over its data channel to the server's aiortc
peer (browser/node/stream_pump.js driving shared.stream_up.Sender in the tab's worker, as
native_node/stream_rtc.py does for native nodes): the signed StreamSubmit and each Chunk are
channel frames of their own, each checked on arrival by server.streams; the server's Resume
comes on the WebSocket. The tab sends one chunk at a time, each once the channel's buffer holds
less than a chunk. When the server drops the channel mid-upload (frames still in flight are
lost with it), the tab announces the update again on its WebSocket, the server resumes it at
its first missing chunk, and the tab offers a new channel, which its next update takes."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from server.keys import COORDINATOR

CHUNK_MB = 0.05
CUT_AFTER = 2  # chunks of round 0's update the server verifies before it drops the channel
ROUNDS = 2
RUN: dict[str, object] = {
    "model": "gpt-tiny", "inner_steps": 8, "batch_size": 16, "deadline_s": 120.0, "quorum": 1,
    "rounds": ROUNDS, "codec": "raw32", "stream_chunk_mb": CHUNK_MB, "transport": "star"}
REFUSALS = ("bad_chunk", "duplicate_chunk", "chunk_out_of_window", "foreign_chunk")


def api(server: Any, path: str) -> Any:
    with urllib.request.urlopen(f"{server.url}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def n_chunks(server: Any) -> int:
    update_bytes = 4 * int(server.run.n_params) + 1  # raw32: a tag byte and the floats
    return -(-update_bytes // int(CHUNK_MB * 2**20))


def check_commits(server: Any, coord: Any, tab: Any) -> dict[str, Any]:
    """Every round committed with the tab's update, no chunk refused, no page error."""
    s: dict[str, Any] = tab.stats()
    assert s["accepted"] == ROUNDS, s
    assert s["rejected"] == 0, s
    assert [r["n_updates"] for r in api(server, "/api/rounds")] == [1] * ROUNDS
    rejected = server.call(lambda: dict(coord.rejected))
    assert not any(rejected.get(code) for code in REFUSALS), rejected
    assert not list((server.data_dir / "spool").iterdir())  # nothing left after the commits
    assert tab.errors == [], tab.errors
    return s


def test_a_tab_streams_its_updates_over_its_data_channel(make_server: Any,
                                                         open_tab: Any) -> None:
    server = make_server(RUN)
    coord = server.call(lambda: server.runner.app[COORDINATOR])
    tab = open_tab(f"{server.url}/?backend=wasm", "star-stream")
    tab.wait("s.state === 'the run is finished'", timeout_s=240)
    s = check_commits(server, coord, tab)
    n = n_chunks(server)
    assert n > 4
    # the server's counters: every frame of both updates came over the channel
    view = api(server, "/api/run")["stream"]
    assert view["completed"] == ROUNDS, view
    assert (view["submits_rtc"], view["chunks_rtc"]) == (ROUNDS, ROUNDS * n), view
    assert (view["submits_ws"], view["chunks_ws"]) == (0, 0), view
    # the tab's: the same paths, and at most 2 chunk frames ever queued in the channel
    st = s["stream"]
    assert (st["submits_rtc"], st["chunks_rtc"]) == (ROUNDS, ROUNDS * n), st
    assert (st["submits_ws"], st["chunks_ws"], st["lost"]) == (0, 0, 0), st
    assert 1 <= st["maxQueuedFrames"] <= 2, st
    assert st["maxQueuedBytes"] <= 2 * (int(CHUNK_MB * 2**20) + 1024), st


def cut_after_chunks(server: Any, coord: Any, what: str) -> dict[str, Any]:
    """The tab's channels carry its frames to the server as usual until the server verified
    CUT_AFTER chunks of round 0's update: then the server drops that channel (`what` =
    "channel") or the tab's WebSocket ("socket", which takes the channel with it), and the
    frames still on their way over that channel are lost. Returns what it saw."""
    hub, intake = coord.rtc, coord.streams
    seen: dict[str, Any] = {"cut": None, "dropped": 0, "channels": 0}
    attach = hub._attach

    def attach_and_watch(conn: Any, channel: Any) -> None:
        attach(conn, channel)
        node_id = conn.peer.node_id
        link = hub.links[node_id]
        forward = link.on_frame
        seen["channels"] += 1

        async def on_frame(frame: bytes) -> None:
            if seen["cut"] is not None and seen["cut"][0] is link:
                seen["dropped"] += 1
                return
            await forward(frame)
            t = intake.transfers.get(node_id)
            if seen["cut"] is None and t is not None and t.msg.round == 0 \
                    and t.reassembly.next == CUT_AFTER:
                seen["cut"] = (link, t.reassembly.n)
                await (hub.close(node_id) if what == "channel" else conn.ws.close())

        link.on_frame = on_frame

    server.call(lambda: setattr(hub, "_attach", attach_and_watch))
    return seen


def test_a_channel_dropped_mid_upload_resumes_on_the_websocket(make_server: Any,
                                                              open_tab: Any) -> None:
    server = make_server(RUN)
    coord = server.call(lambda: server.runner.app[COORDINATOR])
    seen = cut_after_chunks(server, coord, "channel")
    tab = open_tab(f"{server.url}/?backend=wasm", "star-stream-cut")
    tab.wait("s.state === 'the run is finished'", timeout_s=240)
    s = check_commits(server, coord, tab)
    n = n_chunks(server)
    assert seen["cut"] is not None, seen
    assert seen["cut"][1] == n > CUT_AFTER + 1, seen
    assert seen["channels"] == 2, seen  # the first one, and the one the tab offered after
    counters = server.call(lambda: dict(coord.counters))
    assert counters["stream_started"] == ROUNDS, counters
    assert counters["stream_resumed"] == 1, counters  # round 0, at chunk CUT_AFTER
    assert counters["stream_completed"] == ROUNDS, counters
    view = api(server, "/api/run")["stream"]
    # each chunk reached the intake once: the verified ones did not travel again
    assert view["chunks"] == ROUNDS * n, view
    # round 0's announcement and round 1's (over the new channel) on channels, round 0's
    # second one on the WebSocket
    assert (view["submits_rtc"], view["submits_ws"]) == (ROUNDS, 1), view
    # the rest of round 0's on the WebSocket (the new channel was not open yet when the
    # server's Resume came), all of round 1's over the new channel
    assert (view["chunks_rtc"], view["chunks_ws"]) == (CUT_AFTER + n, n - CUT_AFTER), view
    st = s["stream"]
    assert (st["lost"], st["reoffers"], st["resumes"]) == (1, 1, 1), st
    assert st["submits_ws"] == 1, st
    assert 1 <= st["maxQueuedFrames"] <= 2, st


def test_a_socket_cut_mid_upload_resumes_over_the_new_channel(make_server: Any,
                                                              open_tab: Any) -> None:
    """The server closes the tab's WebSocket (and so its channel) after 2 verified chunks:
    the tab reconnects, offers a new channel with the Welcome, resubmits its update over it
    and the server resumes the transfer at its first missing chunk."""
    server = make_server(RUN)
    coord = server.call(lambda: server.runner.app[COORDINATOR])
    seen = cut_after_chunks(server, coord, "socket")
    tab = open_tab(f"{server.url}/?backend=wasm", "star-stream-ws-cut")
    tab.wait("s.state === 'the run is finished'", timeout_s=240)
    s = check_commits(server, coord, tab)
    n = n_chunks(server)
    assert seen["cut"] is not None, seen
    assert seen["channels"] == 2, seen  # the first connection's, and the reconnected one's
    assert s["resubmitted"] >= 1, s
    counters = server.call(lambda: dict(coord.counters))
    assert counters["stream_started"] == ROUNDS, counters
    assert counters["stream_resumed"] == 1, counters  # round 0, at chunk CUT_AFTER
    assert counters["stream_completed"] == ROUNDS, counters
    view = api(server, "/api/run")["stream"]
    # every frame over a channel, each chunk once: the 2 verified ones did not travel again
    assert view["chunks"] == ROUNDS * n, view
    assert (view["submits_rtc"], view["chunks_rtc"]) == (ROUNDS + 1, ROUNDS * n), view
    assert (view["submits_ws"], view["chunks_ws"]) == (0, 0), view
    st = s["stream"]
    assert st["resumes"] == 1, st
    assert st["submits_ws"] == st["chunks_ws"] == 0, st
    assert 1 <= st["maxQueuedFrames"] <= 2, st
