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
                 "--autotune-pin", json.dumps({"budget_s": 5.0}), "--rounds", "4")
    for i in range(2):
        procs.node(f"n{i}", port)
    rows = wait_for(lambda: len(d := decisions(port)) >= 3 and d, 120,
                    "three autotune decisions")
    by_round = {d["round"]: d for d in rows}
    first = by_round[1]  # decided after round 0 (H = 20 fixed), applies to round 1
    assert [n["steps"] for n in first["inputs"]["nodes"]] == [20, 20]
    assert first["settings"]["budget_s"] == 5.0  # the pin
    assert first["settings"]["max_steps"] == 25  # 20 x (1 + max_change): bounded
    assert any(c["setting"] == "max_steps" and "20 -> 25" in c["reason"]
               for c in first["changes"])
    assert all(n["link_mbit_s"] and n["round_trip_s"] > 0 for n in first["inputs"]["nodes"])
    # applied: round 1's updates (the inputs of the decision for round 2) ran 25 steps each
    second = by_round[2]
    assert [n["steps"] for n in second["inputs"]["nodes"]] == [25, 25]
    assert second["settings"]["max_steps"] == 31
    run = get_json(f"http://127.0.0.1:{port}/api/run")
    assert isinstance(run, dict)
    tune = run["autotune"]
    assert tune["enabled"] is True and tune["pins"] == {"budget_s": 5.0}
    assert tune["decisions"] >= 3
    reasons = [c["reason"] for d in tune["recent"] for c in d["changes"]]
    assert any("inner steps" in r for r in reasons)
