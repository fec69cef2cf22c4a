"""Streamed updates over the star data channel (native_node.stream_rtc; docs/protocol.md,
"Streamed updates"), with real processes in a private network namespace the test creates:
a real server (`--transport star --stream-chunk-mb 0.01`), a real native node process and a
native node in the scenario's process (tests/stream_rtc_scenario.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.netns import available
from server.config import RunConfig
from tests.conftest import in_netns

netns = pytest.mark.skipif(available() is not None,
                           reason=f"no private network namespace: {available()}")
N_CHUNKS = 42  # gpt-tiny nano's raw32 update (433,281 bytes) in 10 KiB chunks
CUT_AT = 3  # tests/stream_rtc_scenario.py drops the channel before this chunk


def test_run_config_takes_streaming_with_every_transport_and_says_why_not_with_groups() -> None:
    for transport in ("ws", "star", "p2p"):  # p2p: tests/test_p2p_stream*.py
        assert RunConfig(transport=transport, stream_chunk_mb=1.0).stream_chunk == 2**20
    with pytest.raises(ValueError, match="grouped p2p hands combined shards on in one frame"):
        RunConfig(transport="p2p", stream_chunk_mb=1.0, p2p_groups=2)
    for extra in ({"secagg": True}, {"validation": True}):  # tests/test_stream_secagg.py
        RunConfig(transport="star", stream_chunk_mb=1.0, **extra)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="with secagg or validation for ws or star"):
            RunConfig(transport="p2p", stream_chunk_mb=1.0, **extra)  # type: ignore[arg-type]


@netns
def test_updates_stream_over_the_channel_resume_after_a_drop_and_refuse_bad_chunks(
        tmp_path: Path) -> None:
    res = in_netns("tests.stream_rtc_scenario", [str(tmp_path)], veth=True)
    assert [(r["round"], r["n_updates"]) for r in res["rounds"]] == [(0, 2), (1, 2), (2, 2)]
    done, route, stream = res["done"], res["route"], res["run"]["stream"]
    assert done["cut"]
    assert done["injected"]
    # every update streamed: 2 nodes x 3 rounds, one transfer each, all complete
    assert stream["started"] == stream["completed"] == 6
    # round 0 of the cut node: its channel dropped after chunk CUT_AT - 1; the update was
    # announced again on the WebSocket and only the chunks the server lacked travelled there
    assert route["lost"] == 1
    assert route["reoffers"] == 1
    assert stream["submits_ws"] == 1
    assert f"for round 0 at chunk {CUT_AT} of {N_CHUNKS}" in res["server_log"]
    assert stream["chunks_ws"] == N_CHUNKS - CUT_AT
    # the last round: the node's WebSocket cut after chunk CUT_AT - 1; after the reconnect
    # the update was announced again over the node's new channel and resumed there
    assert done["ws_cut"]
    assert stream["resumed"] == 2
    resumed = re.search(rf"for round 2 at chunk (\d+) of {N_CHUNKS}", res["server_log"])
    assert resumed is not None
    assert int(resumed[1]) >= CUT_AT
    # everything else went over data channels (the cut node's over the new ones), 4 bad
    # chunks included
    assert stream["submits_rtc"] == 7
    assert stream["chunks_rtc"] == 5 * N_CHUNKS + CUT_AT + 4
    assert stream["chunks"] == stream["chunks_rtc"] + stream["chunks_ws"]
    # the bad chunks: each refused with its typed error, the transfer went on and committed
    assert res["run"]["rejected"] == {"bad_chunk": 1, "duplicate_chunk": 1,
                                      "chunk_out_of_window": 1, "foreign_chunk": 1}
    cut = res["cut_node"][:12]
    for code in ("bad_chunk", "duplicate_chunk", "chunk_out_of_window", "foreign_chunk"):
        assert re.search(rf"rejected {code} from {cut}", res["server_log"])
    # the channel was offered again and both nodes end on their data channels
    assert sorted(p["transport"] for p in res["peers"]) == ["webrtc", "webrtc"]
    assert "complete (accepted)" in res["server_log"]


@netns
def test_without_a_channel_the_streamed_updates_go_over_the_websocket(tmp_path: Path) -> None:
    res = in_netns("tests.stream_rtc_scenario", [str(tmp_path), "--no-faults"], veth=False)
    assert [(r["round"], r["n_updates"]) for r in res["rounds"]] == [(0, 2), (1, 2), (2, 2)]
    stream = res["run"]["stream"]
    assert stream["started"] == stream["completed"] == 6
    assert stream["chunks_rtc"] == stream["submits_rtc"] == 0
    assert stream["chunks_ws"] == 6 * N_CHUNKS
    assert stream["submits_ws"] == 6
    assert res["route"].get("frames_rtc", 0) == 0
    assert not res["route"].get("reoffers")
    # (the in-process node's updates were encoded by chunks: read from its spool, on the socket)
    assert res["node_log"].count("streaming the update from its spool") == 3
    assert res["route"]["spooled"] == 3
    assert sorted(p["transport"] for p in res["peers"]) == ["relay", "relay"]
    assert res["run"]["rejected_total"] == 0


@netns
def test_a_one_frame_update_resubmitted_after_a_reconnect_takes_the_new_channel(
        tmp_path: Path) -> None:
    """Its resubmission waits for the new channel apart from the session, which reads the
    channel's answer meanwhile (waiting inside it stalled until rtc_timeout_s, 20 s here,
    then relayed every update of the session over the WebSocket)."""
    res = in_netns("tests.stream_rtc_scenario", [str(tmp_path), "--single"], veth=True)
    assert res["done"]["ws_cut"]
    assert [(r["round"], r["n_updates"]) for r in res["rounds"]] == [(0, 2), (1, 2), (2, 2)]
    assert res["rounds"][1]["duration_s"] < 10
    log = res["node_log"]
    assert "round 1: resubmitting the update" in log
    assert log.count("updates go peer-to-server over WebRTC") == 2  # one channel a connection
    assert "not open after" not in log
    assert res["run"]["stream"]["submits"] == 0  # one-frame updates
    assert sorted(p["transport"] for p in res["peers"]) == ["webrtc", "webrtc"]
    assert res["run"]["rejected_total"] == 0
