"""A tab in a SparseLoCo run (`outer = "sparseloco"`, 2-bit top-k up and down): beside a native
node, the server's page in Chromium says `sparse-step` in its Hello (its JS stepper is
registered), gets round 0's full params on join and then only the server's sparse step each
round ("sparse" RoundOpens), which browser/node/sparse_step.js applies; every result must hash
to the RoundOpen's params_digest (else the tab resyncs, counted). Its uploads are int2 top-k
encoded in JS (codec_int2.js) and accepted. Its download is that of the native node."""

from __future__ import annotations

from typing import Any

from server.keys import COORDINATOR
from shared.sparseloco import FEATURE

ROUNDS = 4
RUN = {"model": "gpt-tiny", "inner_steps": 4, "batch_size": 8, "deadline_s": 120.0,
       "quorum": 2, "rounds": ROUNDS, "codec": "topk", "error_feedback": True,
       "codec_params": {"fraction": 0.04, "values": "int2"},
       "outer": "sparseloco", "outer_lr": 1.0, "outer_params": {"fraction": 0.04}}


def test_a_tab_applies_sparse_steps_bit_for_bit(make_server: Any, open_tab: Any,
                                                native_node: Any) -> None:
    server = make_server(RUN)
    native = native_node(server)
    tab = open_tab(f"{server.url}/?backend=wasm", "tab")
    tab.wait("s.state === 'the run is finished'", timeout_s=300)
    s = tab.stats()
    assert s["accepted"] == ROUNDS, s  # its int2 updates decode at the server
    assert s["rejected"] == 0, s
    # round 0's params on join, then the sparse step of every later round, each reproducing
    # the server's params digest: bit-identical with the server, no resync
    assert s["downlink"] == {"full": 1, "delta": 0, "sparse": ROUNDS - 1, "outer": 0,
                             "resyncs": 0}, s
    coord = server.call(lambda: server.runner.app[COORDINATOR])
    peers = server.call(lambda: {p.node_id: (p.runtime, p.features, p.bytes_down)
                                 for p in coord.peers.values()})
    by_runtime = {rt: (feats, down) for rt, feats, down in peers.values()}
    assert set(by_runtime) == {"browser", "native"}, peers
    assert FEATURE in by_runtime["browser"][0], peers
    tab_down, native_down = by_runtime["browser"][1], by_runtime["native"][1]
    # the same frames as the native node's (full params once, then sparse steps): about its
    # bytes; a params delta would cost ~4x the sparse step per round
    print(f"downlink: tab {tab_down} B, native {native_down} B; tab kinds {s['downlink']}")
    assert 0.8 < tab_down / native_down < 1.25, (tab_down, native_down)
    assert native.proc.poll() in (None, 0)
    assert tab.errors == [], tab.errors
