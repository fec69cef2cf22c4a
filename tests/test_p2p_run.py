"""The `p2p` topology end to end: a real server and real native nodes inside a private network
namespace the test creates (tests/p2p_scenario.py), shards swapped over direct data channels.

- honest nodes: every round commits, each node assembles the aggregate, and from round 1 on
  the server only receives the owners' reduced shards and sends each node a few KB (the outer
  step to apply), not the params;
- a lying owner (tests/p2p_faulty_node.py forges every shard it reduces): each disputed shard
  gets an extra owner, the majority stands, the liar is recorded (`p2p_mismatch`) and
  slashed with `p2p_outvoted` evidence that the ledger export verifies offline (and a
  tampered evidence frame does not), and the model trains as in the honest run;
- a node that stops mid-transfer and is killed -9: it is dropped from the reduction, its
  shards are reassigned and the round commits with the others;
- no usable interface (loopback only): ICE fails, the shards go through the server (relay),
  and /api/peers says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.netns import available
from shared.ledger import TamperedLedger, canonical
from shared.ledger_audit import parse_export, verify_export
from tests.conftest import in_netns

pytestmark = pytest.mark.skipif(available() is not None,
                                reason=f"no private network namespace: {available()}")
UPDATE = 4 * 9610  # mlp-digits: bytes of one raw float32 update


def scenario(tmp: Path, nodes: int, fault: str, rounds: int = 3, *extra: str,
             veth: bool = True) -> dict[str, Any]:
    return in_netns("tests.p2p_scenario", [str(tmp), str(nodes), str(rounds), fault, *extra],
                    veth=veth, timeout=280)


def node_id(log: str) -> str:
    return log.split("node id ", 1)[1].split()[0]


def test_honest_nodes_reduce_among_themselves(tmp_path: Path) -> None:
    res = scenario(tmp_path, 3, "none")
    rounds = res["rounds"]
    assert [r["n_updates"] for r in rounds] == [3, 3, 3]
    losses = [r["eval_loss"] for r in rounds]
    assert losses[2] < losses[1] < losses[0]
    for r in rounds[1:]:  # steady state: owners' shards in, control messages out
        assert r["bytes_up"] < 2 * UPDATE + 3 * 12_000
        assert r["bytes_down"] < UPDATE  # no params: every node steps itself
    assert {p["transport"] for p in res["peers"]} == {"p2p"}
    assert all(p["p2p_relayed_bytes"] == 0 for p in res["peers"])
    for log in res["node_logs"]:  # rounds 0 and 1 at least (after the last round's commit
        assert log.count("holding the aggregate") >= 2  # a node may leave before assembling)
        assert "0 relayed" in log
        assert "p2p channel to" in log
    assert res["rejections"] == []


def test_a_lying_owner_is_outvoted_and_recorded(tmp_path: Path) -> None:
    res = scenario(tmp_path, 4, "lie")
    assert [r["n_updates"] for r in res["rounds"]] == [4, 4, 4]
    liar = node_id(res["node_logs"][0])
    recs = res["rejections"]
    assert recs
    assert {r["node_id"] for r in recs} == {liar}
    assert {r["code"] for r in recs} == {"p2p_mismatch"}
    assert {r["round"] for r in recs} == {0, 1, 2}
    assert res["rounds"][-1]["eval_loss"] < 0.8  # the forged shards never reached the model
    export = res["ledger_export"].encode()
    state = verify_export(export)
    slashes = [r["entry"] for r in parse_export(export).records
               if r["entry"]["kind"] == "slash"]
    assert state.slashes == len(slashes) >= 1
    assert {e["body"]["node"] for e in slashes} == {liar}
    assert {e["body"]["evidence"]["kind"] for e in slashes} == {"p2p_outvoted"}
    blob = slashes[0]["body"]["evidence"]["frames"][0]  # the liar's signed result, altered
    lines = [json.loads(line) for line in export.splitlines()]
    for obj in lines:
        if obj.get("evidence") == blob:
            obj["data"] = obj["data"][:-2] + ("00" if obj["data"][-2:] != "00" else "01")
    with pytest.raises(TamperedLedger):
        verify_export(b"\n".join(canonical(o) for o in lines) + b"\n")
    # caught in round 0, the liar never serves a shard again: from round 1 on the members
    # hold the true aggregate and step themselves (no params download)
    assert res["rounds"][2]["bytes_down"] < 3 * UPDATE  # it was 357 KB: 4 x (params + m)


def test_a_peer_killed_mid_transfer_is_dropped_and_the_round_completes(tmp_path: Path) -> None:
    res = scenario(tmp_path, 4, "vanish")
    assert "vanished mid-transfer" in res["node_logs"][0]
    assert [r["n_updates"] for r in res["rounds"]] == [3, 3, 3]
    assert "from the reduction; shards reassigned" in res["server_log"]
    assert res["rounds"][-1]["eval_loss"] < res["rounds"][0]["eval_loss"]


def test_without_direct_channels_the_shards_go_through_the_server(tmp_path: Path) -> None:
    res = scenario(tmp_path, 3, "none", 2, "--rtc-timeout-s", "2", veth=False)  # ICE fails
    assert [r["n_updates"] for r in res["rounds"]] == [3, 3]
    assert {p["transport"] for p in res["peers"]} == {"p2p-relayed"}
    assert all(p["p2p_relayed_bytes"] > 0 for p in res["peers"])
    assert all("relaying through the server" in log for log in res["node_logs"])
