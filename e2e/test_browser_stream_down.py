"""A tab in a streaming run (stream_chunk_mb): the server's page in Chromium gets each round's
params as a streamed RoundOpen (its Hello says `stream-params`): the signed manifest, then
the chunks its participant fetches (shared.stream_down.Fetcher, driven from
browser/node/node_glue.py), checked and reassembled in Pyodide. It trains every round from
those params; no chunk is refused and the page logs no error."""

from __future__ import annotations

from typing import Any

from server.keys import COORDINATOR

CHUNK_MB = 0.05
RUN = {"model": "gpt-tiny", "inner_steps": 8, "batch_size": 16, "deadline_s": 120.0,
       "quorum": 1, "rounds": 2, "stream_chunk_mb": CHUNK_MB}


def test_a_tab_trains_from_streamed_roundopens(make_server: Any, open_tab: Any) -> None:
    server = make_server(RUN)
    tab = open_tab(f"{server.url}/?backend=wasm", "tab")
    tab.wait("s.state === 'the run is finished'", timeout_s=240)
    s = tab.stats()
    assert s["accepted"] == RUN["rounds"], s
    assert s["rejected"] == 0, s
    coord = server.call(lambda: server.runner.app[COORDINATOR])
    counters = server.call(lambda: dict(coord.counters))
    n_chunks = -(-4 * server.run.n_params // int(CHUNK_MB * 2**20))
    assert n_chunks > 2
    # every round's params went to the tab in chunks, each sent once (no refetch, no resume)
    assert counters["params_chunks_sent"] == RUN["rounds"] * n_chunks, counters
    assert counters.get("params_resumed", 0) == 0, counters
    rejected = server.call(lambda: dict(coord.rejected))
    assert not any(rejected.get(code) for code in
                   ("bad_chunk", "duplicate_chunk", "chunk_out_of_window", "foreign_chunk"))
    assert tab.errors == [], tab.errors
