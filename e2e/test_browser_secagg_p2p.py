"""Secure aggregation peer to peer with tabs (issue 18): two native nodes and two tabs in a
`secagg` run with `transport = "p2p"`. Every member masks its fixed-point update, sends slices
of the masked words to the shards' owners (one shard per member, so both tabs own shards and
sum theirs in JS, browser/node/p2p_kernels.js), the owners upload ring sums, the server joins
and unmasks them. The round commits, the unmasked sum is exactly the Z_2^32 sum of the four
members' plain fixed-point words (each keeps its own: the tabs in the page, the native nodes
in their state dirs for this test), and the committed params are the outer step of its mean.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from e2e.conftest import wait_until
from e2e.test_browser_secagg import api, plain_of
from shared.outer import OuterConfig, outer_step

RUN = {"model": "mlp-digits", "inner_steps": 60, "batch_size": 32, "deadline_s": 90.0,
       "quorum": 4, "rounds": 1, "secagg": True, "secagg_clip": 1.0,
       "secagg_timeout_s": 30.0, "transport": "p2p"}


def test_two_tabs_and_two_native_nodes_sum_masked_shards_peer_to_peer(
        make_server: Any, native_node: Any, open_tab: Any, tmp_path: Path,
        monkeypatch: Any) -> None:
    monkeypatch.setenv("DAA_SECAGG_KEEP_PLAIN", "1")  # the native nodes keep their words
    server = make_server(RUN)
    theta0, mom0 = server.call(lambda: (np.array(server.run.params), np.array(server.run.momentum)))
    natives = [native_node(server) for _ in range(2)]  # start while the tabs load
    tabs = [open_tab(f"{server.url}/?backend=wasm", f"tab{i}") for i in range(2)]
    wait_until(lambda: api(server, "/api/run")["committed_rounds"] >= 1, 90, "round 0")

    last = api(server, "/api/run")["secagg"]["last"]
    assert last["round"] == 0
    assert len(last["contributors"]) == 4, last
    assert last["excluded"] == {}
    tab_ids = [t.stats()["nodeId"] for t in tabs]
    assert set(tab_ids) <= set(last["contributors"]), last
    for t in tabs:  # each tab owned a shard and summed it in JS (one shard per member)
        t.wait("!!s.p2p && s.p2p.secagg === true && s.p2p.round === 0", timeout_s=10)
        assert t.stats()["p2p"]["owned"], t.stats()["p2p"]
    words = [plain_of(t) for t in tabs]
    words += [(n.log.parent / "secagg-plain-0.u32").read_bytes() for n in natives]
    ring = np.zeros(len(theta0), dtype=np.uint32)
    for w in words:
        ring += np.frombuffer(w, dtype="<u4")
    assert hashlib.sha256(ring.tobytes()).hexdigest() == last["sum_sha256"]
    mean = (ring.view(np.int32).astype(np.float64) / 2 ** last["frac_bits"] / 4
            ).astype(np.float32)
    cfg = server.run.config
    want, _ = outer_step(theta0, mean, mom0, OuterConfig(lr=cfg.outer_lr,
                                                         momentum=cfg.outer_momentum))
    got = server.call(lambda: np.array(server.run.params))
    assert np.array_equal(got, np.asarray(want))
    (row,) = api(server, "/api/rounds")
    assert row["n_updates"] == 4
    for t in tabs:
        t.wait("s.state === 'the run is finished'", timeout_s=30)
        assert t.stats()["rejected"] == 0, t.stats()
        assert t.errors == [], t.errors
    for n in natives:
        assert n.proc.wait(timeout=30) == 0
    tabs[0].screenshot("secagg-p2p-tabs")
