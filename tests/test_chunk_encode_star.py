"""Chunked encoding in `star` runs (shared.chunk_submit, native_node.stream_rtc): a real
server (`--transport star`, llama 2m, 50 KiB stream chunks, int8-block with error feedback),
a real native node process on the one-shot path and a native node encoding its update by
chunks into a spool, whose chunks go over its data channel read from the spool; its channel
dropped mid-transfer (round 0) and its WebSocket closed mid-transfer (the last round) resume
from the spool (tests/chunk_star_scenario.py, in a private network namespace the test
creates)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.netns import available
from tests.chunk_star_scenario import CUT_AT, ROUNDS
from tests.conftest import in_netns

netns = pytest.mark.skipif(available() is not None,
                           reason=f"no private network namespace: {available()}")


@netns
@pytest.mark.timeout(260)
def test_a_star_run_streams_updates_encoded_by_chunks_from_the_spool_and_resumes_there(
        tmp_path: Path) -> None:
    res = in_netns("tests.chunk_star_scenario", [str(tmp_path)], veth=True)
    assert [(r["round"], r["n_updates"]) for r in res["rounds"]] == \
        [(r, 2) for r in range(ROUNDS)]
    assert res["run"]["committed_rounds"] == ROUNDS
    done, route, stream, log = res["done"], res["route"], res["run"]["stream"], res["node_log"]
    assert done["cut"]
    assert done["ws_cut"]
    # the chunked path each round: Δ read by chunks, encoded into the spool, streamed from it
    assert res["counts"]["chunk_encoded"] == ROUNDS
    reads = re.findall(r"round \d+: update encoded by chunks \((\d+) chunks", log)
    assert [int(k) for k in reads] == [4] * ROUNDS  # 2 of 2^20 values: finiteness, encoding
    assert "streaming the update (" not in log  # never a one-shot Submit split
    spooled = re.findall(r"streaming the update from its spool \((\d+) bytes in (\d+) chunks",
                         log)
    # announced: each round once, again on the WebSocket after the lost channel (round 0),
    # again over the new channel after the reconnect (the last round)
    assert len(spooled) == ROUNDS + 2, log[-3000:]
    assert route["spooled"] == ROUNDS + 1  # the reconnect's resubmission is a second start
    size, n = int(spooled[0][0]), int(spooled[0][1])
    assert n > CUT_AT + 1
    assert all((int(s), int(k)) == (size, n) for s, k in spooled)
    # the one-shot node beside it streams the same codec's payload of the same size
    oneshot = res["oneshot_log"]
    assert "update encoded by chunks" not in oneshot
    assert re.findall(r"streaming the update \((\d+) bytes", oneshot) == [str(size)] * ROUNDS
    # round 0: the channel dropped after chunk CUT_AT - 1; the update was announced again on
    # the WebSocket and only the chunks the server lacked went, read from the spool
    assert route["lost"] == 1
    assert route["reoffers"] == 1
    assert f"for round 0 at chunk {CUT_AT} of {n}" in res["server_log"]
    assert stream["submits_ws"] == 1
    assert stream["chunks_ws"] == n - CUT_AT
    # the last round: resumed after the reconnect over the node's new channel
    last = re.search(rf"for round {ROUNDS - 1} at chunk (\d+) of {n}", res["server_log"])
    assert last is not None
    assert int(last[1]) >= CUT_AT
    assert stream["resumed"] == 2
    assert res["sender"]["resumed"] == 2
    # everything else over data channels: the one-shot node's, the chunked node's first
    # chunks of round 0 and its last round (over the old channel, then the new one)
    assert stream["started"] == stream["completed"] == 2 * ROUNDS
    assert stream["submits_rtc"] == ROUNDS + ROUNDS + 1
    assert stream["chunks_rtc"] == ROUNDS * n + CUT_AT + n
    assert stream["chunks"] == stream["chunks_rtc"] + stream["chunks_ws"]
    assert route["frames_rtc"] > n
    assert res["server_log"].count("complete (accepted)") == 2 * ROUNDS
    assert res["run"]["rejected_total"] == 0
    assert sorted(p["transport"] for p in res["peers"]) == ["webrtc", "webrtc"]
