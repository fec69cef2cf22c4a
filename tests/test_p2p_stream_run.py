"""Streamed p2p runs end to end: a real server with `--transport p2p --stream-chunk-mb` and real
native nodes inside a private network namespace the test creates (tests/p2p_stream_scenario.py).

- a 4 KiB chunk cuts mlp-digits' 38,440-byte update into 10 shards over 3 members: rounds
  commit, the model trains, every Shard frame a node sends (pieces, results, receipts) and
  every shard payload the server sees stays within a chunk (plus the frame's signature);
- node 0 closes its connection to a peer in round 0 with pieces in flight both ways
  (tests/p2p_stream_node.py): both sides resend only the pieces not acknowledged (at most a
  window), through the relay, the owner refuses any it already had as duplicates (and
  acknowledges them again), and every round still commits with all 3 updates;
- a tab's Hello in such a run gets a typed refusal (bad_update, field runtime) saying why."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from bench.netns import available
from shared.p2p_stream import DEFAULT_WINDOW
from tests.conftest import in_netns

netns = pytest.mark.skipif(available() is not None,
                           reason=f"no private network namespace: {available()}")
CHUNK = 4096  # bytes: --stream-chunk-mb 0.00390625
SIGNED = 4096  # a frame's header and ML-DSA-65 signature (3,309 bytes) on top of its payload
STREAMED = re.compile(r"round (\d+): streamed: (\d+) shards; (\d+) pieces sent, (\d+) resent "
                      r"after (\d+) lost channels since start; largest shard frame (\d+) bytes; "
                      r"peak held (\d+) bytes; refused (.*)")


def scenario(tmp: Path, fault: str) -> dict[str, Any]:
    return in_netns("tests.p2p_stream_scenario", [str(tmp), "3", "3", str(CHUNK / 2**20), fault],
                    veth=True, timeout=280)


def streamed(log: str) -> list[tuple[str, ...]]:
    return [m.groups() for m in STREAMED.finditer(log)]


@netns
def test_a_streamed_p2p_run_trains_with_every_frame_within_a_chunk(tmp_path: Path) -> None:
    res = scenario(tmp_path, "none")
    rounds = res["rounds"]
    assert [(r["n_updates"], r["attempts"]) for r in rounds] == [(3, 1)] * 3
    assert rounds[2]["eval_loss"] < rounds[0]["eval_loss"]
    assert 0 < res["run"]["p2p"]["shard_max_bytes"] <= CHUNK  # results seen by the server
    assert res["rejections"] == []
    for log in res["node_logs"]:
        lines = streamed(log)
        assert len(lines) >= 2  # rounds 0 and 1 at least (a node may leave before round 2's)
        for _, shards, _, resent, _, largest, held, refused in lines:
            assert int(shards) == 10
            assert int(resent) == 0
            assert 0 < int(largest) <= CHUNK + SIGNED
            # an owner held at most a window of pieces from each other member at once
            assert 0 < int(held) <= 2 * DEFAULT_WINDOW * CHUNK
            assert refused == "{}"
        assert "0 relayed" in log


@netns
def test_a_channel_dropped_mid_exchange_resumes_from_the_first_unacknowledged_piece(
        tmp_path: Path) -> None:
    res = scenario(tmp_path, "cut")
    assert [(r["n_updates"], r["attempts"]) for r in res["rounds"]] == [(3, 1)] * 3
    assert res["rounds"][2]["eval_loss"] < res["rounds"][0]["eval_loss"]
    cutter = res["node_logs"][0]
    assert "P2P-STREAM cut channel to" in cutter
    peer = cutter.split("P2P-STREAM cut channel to ", 1)[1].split()[0]
    resumed = [log for log in res["node_logs"] if "lost with" in log]
    assert cutter in resumed  # it had pieces in flight on the channel it closed
    # its peer too, when it had (likely: receipts come only once a shard is reduced); the
    # third node's channels were not cut, but one may still drop on a loaded machine (seen
    # in CI): every node that lost one resent from its first unacknowledged piece (below)
    assert any(p["node_id"].startswith(peer[:12]) for p in res["peers"])  # a member
    for log in resumed:  # counters since the start: a peer may hold round 0's aggregate
        last = streamed(log)[-1]  # before the loss of its pieces to the cutter shows
        sent, resent, lost = int(last[2]), int(last[3]), int(last[4])
        assert lost == 1
        assert 0 < resent <= DEFAULT_WINDOW < sent  # from the first unacknowledged, not all
        # a resent piece the owner already had is refused as a duplicate (and acknowledged
        # again); whether any was depends on what the closing channel still delivered
        assert re.fullmatch(r"\{('duplicate_chunk': \d+)?\}", last[7])
    # the cutter resent through the server; its peer either did too or, when its first plan
    # came after the cut, waited for the fresh channel it then negotiated (also seen here)
    me = cutter.split("joined run ", 1)[1].split(" as ", 1)[1].split(":")[0]
    relayed = {p["node_id"][:12]: p["p2p_relayed_bytes"] for p in res["peers"]}
    assert relayed[me] > 0
    # nothing refused but, on a loaded machine (CI), a piece relayed to a peer whose socket
    # was reconnecting at that moment (unknown_node): the piece is sent again, as above
    assert {r["code"] for r in res["rejections"]} <= {"unknown_node"}, res["rejections"]
    assert res["run"]["p2p"]["shard_max_bytes"] <= CHUNK  # relayed pieces too


async def test_a_tab_is_refused_in_a_streamed_p2p_run_with_the_reason(tmp_path: Path) -> None:
    from tests.test_ws_protocol import serve

    async with serve(tmp_path, quorum=2, aggregator="median", transport="p2p",
                     stream_chunk_mb=0.25) as srv:
        tab = await srv.client("tab", hello=False)
        await tab.send(tab.hello(runtime="browser"))
        err = await tab.error("bad_update")
        assert err.field == "runtime"
        assert "tabs do not do yet" in err.message
        native = await srv.client("native")
        assert native.welcome is not None
        assert native.welcome.stream_chunk == 2**18
