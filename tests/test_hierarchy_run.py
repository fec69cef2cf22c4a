"""Hierarchical aggregation end to end: a real server (`--transport p2p --p2p-groups 2`) and
six real native nodes in two regions inside a private network namespace the test creates
(tests/hierarchy_scenario.py); updates go to the group aggregators over real aiortc data
channels.

- honest: every round commits with all six updates in two groups of three, every node holds
  the combined aggregate (forwarded by its aggregators), and from round 1 on the server
  receives two group results per group and sends each node the outer step, not the params;
- a lying aggregator (tests/hierarchy_faulty_node.py forges its group results): its group
  gets a third aggregator, the majority stands, the liar is recorded (`hierarchy_mismatch`)
  and the model trains as in the honest run;
- an aggregator that stops and is killed -9: it is dropped, another member aggregates its
  group, and every round commits with the other five;
- an aggregator that stops but stays connected: the other aggregator reports its update
  missing, the server drops it from the group, and every round commits with the others."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.netns import available
from tests.conftest import in_netns

pytestmark = pytest.mark.skipif(available() is not None,
                                reason=f"no private network namespace: {available()}")
UPDATE = 4 * 9610  # mlp-digits: bytes of one raw float32 update


def scenario(tmp: Path, fault: str, nodes: int = 6, rounds: int = 3) -> dict[str, Any]:
    return in_netns("tests.hierarchy_scenario", [str(tmp), str(nodes), str(rounds), fault],
                    timeout=280)


def assert_faulty_left(rounds: list[dict[str, Any]]) -> None:
    """Every round committed; the faulty node (elected in round 0 or 1: a group of three
    rotates its two aggregators by round) took part until then and in no round after."""
    counts = [r["n_updates"] for r in rounds]
    assert len(counts) == 3
    assert counts[2] == 5
    assert counts in ([5, 5, 5], [6, 5, 5])


def node_id(log: str) -> str:
    return log.split("node id ", 1)[1].split()[0]


def test_honest_groups_reduce_at_their_aggregators(tmp_path: Path) -> None:
    res = scenario(tmp_path, "none")
    rounds = res["rounds"]
    assert [r["n_updates"] for r in rounds] == [6, 6, 6]
    assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"]
    assert "6 members in 2 groups (3, 3)" in res["server_log"]
    for r in rounds[1:]:  # 2 groups x 2 aggregators x fp16 results (+ signed control)
        assert r["bytes_up"] < 4 * UPDATE // 2 + 6 * 12_000
        # no params (6 x UPDATE in ws): 4 fp16 aggregates (2 x UPDATE) + signed control
        assert r["bytes_down"] < 5 * UPDATE
    for log in res["node_logs"]:
        assert log.count("holding the combined aggregate") >= 2
        assert "p2p channel to" in log
        assert "outer step" not in log  # the aggregate it held gave the server's params
    assert res["rejections"] == []


def test_a_lying_aggregator_is_outvoted_and_recorded(tmp_path: Path) -> None:
    res = scenario(tmp_path, "lie")
    assert [r["n_updates"] for r in res["rounds"]] == [6, 6, 6]
    assert "HIER-FAULT forged" in res["node_logs"][0]
    liar = node_id(res["node_logs"][0])
    recs = res["rejections"]
    assert recs
    assert {r["node_id"] for r in recs} == {liar}
    assert {r["code"] for r in recs} == {"hierarchy_mismatch"}
    assert "aggregates it too" in res["server_log"]
    assert res["rounds"][-1]["eval_loss"] < 0.8  # the forged result never reached the model


def test_a_vanished_aggregator_is_replaced_and_the_round_completes(tmp_path: Path) -> None:
    res = scenario(tmp_path, "vanish")
    assert "HIER-FAULT vanished" in res["node_logs"][0]
    assert "aggregators replaced" in res["server_log"]
    assert_faulty_left(res["rounds"])
    assert res["rounds"][-1]["eval_loss"] < res["rounds"][0]["eval_loss"]


def test_a_hung_aggregator_is_reported_missing_and_dropped(tmp_path: Path) -> None:
    res = scenario(tmp_path, "silent")
    assert "HIER-FAULT vanished" in res["node_logs"][0]
    hung = node_id(res["node_logs"][0])
    assert f"lacks the updates of ['{hung[:12]}']" in res["server_log"]
    assert "telling the server" in "".join(res["node_logs"][1:])
    assert_faulty_left(res["rounds"])
    assert res["rounds"][-1]["eval_loss"] < res["rounds"][0]["eval_loss"]
