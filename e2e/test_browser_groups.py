"""Browser tabs as plain members of a grouped p2p run (issue 25 item 3, p2p_groups).

Runs bench.p2p_tabs --groups 2 inside a private network namespace (bench.netns): a real
server, six native nodes and two headless Chromium tabs in two groups of four (each group
needs two native members that may aggregate: six natives make that hold for any cut).
Tabs are never elected aggregators (shared.hierarchy.elect takes native members only): each
tab sends its update to its group's two aggregators, takes the combined aggregate they
forward, and applies the next RoundOpen's outer step itself, checked against the params
digest.
"""

from __future__ import annotations

from pathlib import Path

from e2e.conftest import p2p_tabs


def test_tabs_are_members_of_a_grouped_run(tmp_path: Path) -> None:
    rc, out = p2p_tabs(["--native", "6", "--tabs", "2", "--rounds", "3", "--groups", "2",
                        "--no-native-only", "--limits", "--dir", str(tmp_path)])
    assert rc == 0, out
    assert out["rounds_committed"] == 3, out
    assert out["n_updates"] == [8, 8, 8], out  # both tabs' updates in every round
    server_log = (tmp_path / "mixed" / "server.log").read_text()
    assert server_log.count("8 members in 2 groups") == 3, server_log[-3000:]
    assert all(g in (0, 1) for g in out["tab_groups"]), out  # each tab reduced in a group
    # each tab held the group's combined aggregate and stepped itself, never resyncing
    assert all(s is not None and s >= 1 for s in out["tab_outer_steps"]), out
    assert out["tab_resyncs"] == [0, 0], out
    assert out["console_errors"] == [], out
