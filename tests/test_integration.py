"""Real processes on loopback: `python -m server` and `python -m native_node join`.

Covers the round state machine under failures (a stalled node, a dead node, too few nodes)
and kill -9 of the coordinator followed by a restart on the same --data-dir.
"""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path
from typing import Any

from bench.common import free_port, get_json
from tests.conftest import Procs, wait_for

FAST = ("--model", "mlp-digits", "--inner-steps", "20", "--batch-size", "32")


def api(port: int, path: str) -> object:
    return get_json(f"http://127.0.0.1:{port}{path}")


def api_run(port: int) -> dict[str, Any]:
    run = api(port, "/api/run")
    assert isinstance(run, dict)
    return run


def api_list(port: int, path: str) -> list[dict[str, Any]]:
    out = api(port, path)
    assert isinstance(out, list)
    return out


def rounds(port: int) -> list[dict[str, Any]]:
    return api_list(port, "/api/rounds")


def connected(port: int) -> int:
    return int(api_run(port)["peers_connected"])


def test_stalled_node_round_closes_at_deadline_then_dead_node_stops_blocking(
        procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    deadline_s = 6.0
    procs.server("server", tmp_path / "run", port, *FAST, "--quorum", "2",
                 "--deadline-s", str(deadline_s))
    nodes = [procs.node(f"n{i}", port) for i in range(3)]
    wait_for(lambda: connected(port) == 3, 60, "3 nodes connected")
    first_full = wait_for(lambda: [r for r in rounds(port) if r["n_updates"] == 3], 60,
                          "a round with all 3 updates")[0]["round"]
    assert first_full >= 0
    stalled = nodes[2]
    stalled.send_signal(signal.SIGSTOP)  # alive socket, no progress: only the deadline helps
    n0 = len(rounds(port))  # round n0 was open at the stop (it may hold the stalled update)
    row = wait_for(lambda: [r for r in rounds(port) if r["round"] == n0 + 1], 60,
                   "a round opened after the stall")[0]
    # the round opened after the stall waited for the stalled node until its deadline
    assert row["n_updates"] == 2, row
    assert row["duration_s"] >= deadline_s - 0.5, row  # the server's measure of the round
    stalled.kill()  # now it is gone for good: rounds stop waiting for it
    stalled.wait(10)
    wait_for(lambda: connected(port) == 2, 30, "the dead node to be dropped")
    peers = api_list(port, "/api/peers")
    assert sorted(p["state"] == "gone" for p in peers) == [False, False, True]
    n = len(rounds(port))
    quick = wait_for(lambda: rounds(port)[n + 1:], 60, "two rounds after the kill")[0]
    # committed on the two live nodes' updates, not at its deadline (which a round still
    # waiting for the dead node would have reached, as the stalled round above did)
    assert quick["n_updates"] == 2, quick
    assert quick["duration_s"] < deadline_s, quick
    # Ctrl-C on a node: a clean exit
    nodes[0].send_signal(signal.SIGINT)
    assert nodes[0].wait(15) == 0
    assert "node stopped" in procs.log("n0")


def test_below_quorum_round_is_retried_not_committed(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    procs.server("server", tmp_path / "run", port, *FAST, "--quorum", "3",
                 "--deadline-s", "2")
    for i in range(2):
        procs.node(f"n{i}", port)
    run = wait_for(lambda: (r := api_run(port))["retries"] >= 2
                   and r["updates_in_round"] == 2 and r,
                   90, "two retries below quorum with both updates in")
    assert run["committed_rounds"] == 0
    assert run["round"] == 0
    assert run["attempt"] >= 2
    assert run["updates_in_round"] == 2
    assert rounds(port) == []
    procs.node("n2", port)
    row = wait_for(lambda: rounds(port), 60, "round 0 committed once quorum is reached")[0]
    assert row["round"] == 0
    assert row["n_updates"] == 3
    assert row["attempts"] >= 3


def test_server_kill9_restart_resumes_and_nodes_reconnect(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "run"
    server = procs.server("server1", data, port, *FAST, "--quorum", "2", "--deadline-s", "30")
    for i in range(2):
        procs.node(f"n{i}", port)
    wait_for(lambda: len(rounds(port)) >= 2, 90, "two committed rounds")
    run_id = api_run(port)["run_id"]
    server.send_signal(signal.SIGKILL)  # mid-run: the next round is open and being trained
    server.wait(10)
    with sqlite3.connect(data / "run.sqlite") as db:
        committed = [r[0] for r in db.execute("SELECT round FROM rounds ORDER BY round")]
    assert committed == list(range(len(committed)))
    assert len(committed) >= 2
    procs.server("server2", data, port)  # same data dir, no flags: the stored config
    wait_for(lambda: connected(port) == 2, 60, "nodes to reconnect by themselves")
    run = api_run(port)
    assert run["run_id"] == run_id
    assert run["committed_rounds"] >= len(committed)
    assert f"at round {len(committed)}" in procs.log("server2")
    after = wait_for(lambda: [r for r in rounds(port) if r["round"] >= len(committed) + 1],
                     90, "rounds committed after the restart")
    all_rounds = [r["round"] for r in rounds(port)]
    assert all_rounds == list(range(len(all_rounds)))  # no gap, no round committed twice
    assert after[0]["n_updates"] == 2
    with sqlite3.connect(data / "run.sqlite") as db:
        per_round = db.execute("SELECT round, COUNT(*) FROM updates GROUP BY round").fetchall()
    assert all(count == 2 for _, count in per_round), per_round
    for name in ("n0", "n1"):
        assert "reconnecting" in procs.log(name)


def test_validator_node_scores_every_round(procs: Procs, tmp_path: Path) -> None:
    """`--validation` with a `--role validator` node: the validator never trains, receives
    each round's candidates, and its signed verdicts reach the server. The threshold is wide
    (100%): this test is about scoring; an honest update of this fast, noisy setting can end
    +10% worse on held-out loss, and with quorum 2 of 2 trainers an exclusion would hold the
    round until another trainer joins (tests/test_validation.py covers exclusions)."""
    port = free_port()
    procs.server("server", tmp_path / "run", port, *FAST, "--quorum", "2", "--rounds", "3",
                 "--validation", "--validation-threshold", "1.0", "--deadline-s", "30")
    val = procs.start("validator", ["-m", "native_node", "up", "--role", "validator",
                                    "--coordinator", f"127.0.0.1:{port}", "--state-dir",
                                    str(tmp_path / "validator"), "--threads", "1", "--quiet"])
    wait_for(lambda: any(p["role"] == "validator" for p in api_list(port, "/api/peers")),
             60, "the validator to join")
    for i in range(2):
        procs.node(f"n{i}", port)
    wait_for(lambda: len(rounds(port)) == 3, 90, "3 rounds committed")
    run = api_run(port)
    assert run["validation"] is True, run
    assert run["verdicts"] == 3, run
    assert all(r["n_updates"] == 2 for r in rounds(port))
    (v,) = [p for p in api_list(port, "/api/peers") if p["role"] == "validator"]
    assert v["updates_accepted"] == 0
    assert val.wait(30) == 0  # leaves when the run is final
    assert procs.log("validator").count("scored 2 candidates") == 3
