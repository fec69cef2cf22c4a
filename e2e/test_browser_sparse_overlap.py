"""A tab in an overlapped SparseLoCo run (`overlap` on, `outer = "sparseloco"`): right after
its Submit of round t the tab's train worker runs round t+1's steps from where round t ended
(browser/node/ahead.js); round t+1's sparse RoundOpen (applied in JS, digest checked) then
takes them over (merge: theta_{t+1} + (local - start)) and the worker trains the rest of H.
Every update is accepted, rounds 1..3 merged steps run ahead, no resync. Prints the tab's
compute / wall (from its first round to its last update) for a run with overlap off and on."""

from __future__ import annotations

from typing import Any

import pytest

from e2e.test_browser_sparse import RUN as SPARSE_RUN

ROUNDS = 4
RUN = {**SPARSE_RUN, "inner_steps": 8, "rounds": ROUNDS}


def run_tab(make_server: Any, open_tab: Any, native_node: Any, overlap: bool) -> dict[str, Any]:
    server = make_server({**RUN, "overlap": overlap})
    native_node(server)
    tab = open_tab(f"{server.url}/?backend=wasm", f"tab-{overlap}")
    tab.wait("s.state === 'the run is finished'", timeout_s=300)
    s: dict[str, Any] = tab.stats()
    assert tab.errors == [], tab.errors
    tab.close()
    return s


@pytest.mark.parametrize("overlap", [False, True])
def test_a_tab_trains_ahead_in_an_overlapped_sparse_run(make_server: Any, open_tab: Any,
                                                        native_node: Any, overlap: bool) -> None:
    s = run_tab(make_server, open_tab, native_node, overlap)
    assert s["accepted"] == ROUNDS, s
    assert s["rejected"] == 0, s
    assert s["downlink"]["sparse"] == ROUNDS - 1, s
    assert s["downlink"]["resyncs"] == 0, s
    util = s["computeS"] / s["trainWallS"]
    print(f"overlap {overlap}: tab compute {s['computeS']:.2f} s / wall {s['trainWallS']:.2f} s"
          f" = {util:.3f}; steps ahead {s.get('stepsAhead')}, merges {s.get('aheadMerges')}")
    if overlap:  # every round after the first took over steps run ahead
        assert s["aheadMerges"] == ROUNDS - 1, s
        assert s["stepsAhead"] > 0, s
    else:
        assert (s.get("aheadMerges"), s.get("stepsAhead") or 0) == (0, 0), s
