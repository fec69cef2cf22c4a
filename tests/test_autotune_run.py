"""The autonomy loop on a real server: `python -m server --autotune` with two native nodes on
loopback. A decision is recorded in the store, served by /api/run and /api/autotune, and the
next round's RoundOpen carries it: the nodes train exactly the step cap it set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import free_port, get_json
from tests.conftest import Procs, wait_for

FAST = ("--model", "mlp-digits", "--inner-steps", "20", "--batch-size", "32")


def decisions(port: int) -> list[dict[str, Any]]:
    out = get_json(f"http://127.0.0.1:{port}/api/autotune")
    assert isinstance(out, list)
    return out


def test_decisions_are_recorded_served_and_applied_at_the_next_round(
        procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    # the budget pinned (ample on loopback): the step cap alone binds, so the steps each node
    # trains are exactly what the decision said
    procs.server("server", tmp_path / "run", port, *FAST, "--autotune",
                 "--autotune-pin", json.dumps({"budget_s": 5.0, "deadline_s": 30}), "--rounds", "6")
    for i in range(2):
        procs.node(f"n{i}", port)
    rows = wait_for(lambda: len(d := decisions(port)) >= 5 and d, 120,
                    "five autotune decisions")
    first = rows[0]  # decided after round 0 (the probe: H / 5 = 4 steps), for round 1
    assert first["round"] == 1
    assert {n["steps"] for n in first["inputs"]["nodes"]} == {4}
    assert first["settings"]["budget_s"] == 5.0  # the pins
    assert first["settings"]["deadline_s"] == 30.0
    assert any(c["setting"] == "max_steps" and c["old"] == 4 for c in first["changes"])
    assert all(n["link_mbit_s"] and n["round_trip_s"] > 0 for n in first["inputs"]["nodes"])
    # applied at the next round: every update of round r ran the step cap decided for it
    # (the 5 s budget is ample, so the cap binds); the updates of round r are the inputs of
    # the decision for round r + 1
    by_round = {d["round"]: d for d in rows}
    checked = 0
    for r, d in by_round.items():
        if r + 1 in by_round:
            steps = [n["steps"] for n in by_round[r + 1]["inputs"]["nodes"]]
            assert steps
            assert all(k == d["settings"]["max_steps"] for k in steps), (r, steps)
            checked += len(steps)
    assert checked >= 4
    assert len({d["settings"]["max_steps"] for d in rows} | {4}) >= 2  # it did change H
    run = get_json(f"http://127.0.0.1:{port}/api/run")
    assert isinstance(run, dict)
    tune = run["autotune"]
    assert tune["enabled"] is True
    assert tune["pins"] == {"budget_s": 5.0, "deadline_s": 30}
    assert tune["decisions"] >= 3
    reasons = [c["reason"] for d in tune["recent"] for c in d["changes"]]
    assert any("inner steps" in r for r in reasons)
