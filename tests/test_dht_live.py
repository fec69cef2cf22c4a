"""Kademlia over real carriers (docs/dht.md, "Carriers"): a real `python -m server --dht` is the
bootstrap and the relay; nodes (shared.participant + native_node.mesh + native_node.dht) fill
their tables through it, open data channels to their DHT contacts, and keep finding each other
over those channels after the server is killed, and refill the restarted server's table.
Runs in a private network namespace (WebRTC needs an interface besides loopback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.netns import available
from tests.conftest import in_netns

pytestmark = pytest.mark.skipif(available() is not None,
                                reason=f"no private network namespace: {available()}")
NODES = 4


@pytest.mark.timeout(240)
def test_nodes_keep_finding_each_other_over_channels_while_the_server_restarts(
        tmp_path: Path) -> None:
    res = in_netns("tests.dht_live_scenario", [str(tmp_path), str(NODES)], timeout=200)
    pairs = NODES * (NODES - 1)
    # the server's DHT node was everyone's bootstrap: it knew every node
    assert res["server_dht"]["contacts"] == NODES
    assert res["server_dht"]["in"] > 0
    # with the server up, lookups went through its relay (no channel was open yet)
    assert res["before"] == {**res["before"], "lookups": pairs, "found": pairs}
    assert res["before_counters"].get("relay_out", 0) > 0
    assert res["before_counters"].get("direct_out", 0) == 0
    assert res["channels"] == [NODES - 1] * NODES
    # server killed: every node looks up every other, over the data channels alone
    assert res["relay_up"] == [False] * NODES
    assert res["after"] == {**res["after"], "lookups": pairs, "found": pairs}
    after = res["after_counters"]
    assert after.get("direct_out", 0) >= pairs
    assert after.get("direct_in", 0) >= pairs
    assert after.get("relay_out", 0) == 0
    # the server restarts (same run) with an empty table: the nodes reconnect and their
    # bootstrap pings give it every node again
    assert res["server_dht_after_restart"]["contacts"] == NODES
