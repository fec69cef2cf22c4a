"""The streamed RoundOpen in a real run: `python -m server` (llama tiny at the byte vocab,
102,720 params: a 410,880-byte RoundOpen payload) with `--stream-chunk-mb 0.05`, so the params
travel in 8 chunks, and one real native node that reaches the server through a relay
(bench.netfault) which closes its connection right after the third chunk went through. The
node reconnects, the server offers the same stream again and the node fetches only from its
first missing chunk; it then trains and the rounds commit. No chunk is refused on either
side."""

from __future__ import annotations

import re
from pathlib import Path

from bench.common import free_port, get_json
from bench.netfault import RelayThread
from tests.conftest import Procs, wait_for

CHUNK_MB = 0.05
CHUNK = int(CHUNK_MB * 2**20)
FLAGS = ("--model", "llama", "--flavour", "tiny", "--inner-steps", "2", "--batch-size", "8",
         "--deadline-s", "60", "--quorum", "1", "--stream-chunk-mb", str(CHUNK_MB))


def test_a_node_joins_through_a_chunked_roundopen_resumes_after_a_cut_and_trains(
        procs: Procs, tmp_path: Path) -> None:
    port, rounds = free_port(), 2
    base = f"http://127.0.0.1:{port}"
    procs.server("server", tmp_path / "run", port, *FLAGS, "--rounds", str(rounds))
    wait_for(lambda: get_json(base + "/api/run"), 60, "the server")
    relay = RelayThread(upstream=f"127.0.0.1:{port}")
    relay_port = relay.start()
    try:
        relay.cut_after_download(CHUNK, count=3)  # 3 full chunks through, then the cut
        procs.node("node", relay_port)
        wait_for(lambda: get_json(base + "/api/run")["status"] == "finished", 150,
                 f"the run to finish (logs in {tmp_path})")
        assert relay.stats["cut_after_download"] == 1
        assert relay.stats["connections"] >= 2  # the node came back
    finally:
        relay.stop()
    run = get_json(base + "/api/run")
    assert run["committed_rounds"] == rounds
    assert not any(run["rejected"].get(code) for code in
                   ("bad_chunk", "duplicate_chunk", "chunk_out_of_window", "foreign_chunk"))
    log, node_log = procs.log("server"), procs.log("node")
    params = re.search(r"created run \w+: llama, (\d+) params", log)
    assert params is not None, log[-3000:]
    n_bytes = 4 * int(params[1])
    n_chunks = -(-n_bytes // CHUNK)
    assert n_chunks > 3
    assert f"offering a {n_bytes}-byte RoundOpen payload in {n_chunks} chunks" in log, log[-3000:]
    # the cut download went on from a chunk > 0: the verified chunks did not travel again
    resumed = [int(k) for k in re.findall(
        rf"resuming the streamed RoundOpen of \w+ at chunk (\d+) of {n_chunks}", log)]
    assert resumed, log[-3000:]
    assert all(k >= 3 for k in resumed)
    # every round's params went streamed and the node trained from them
    assert node_log.count("params download complete") >= rounds, node_log[-3000:]
    assert re.search(r"round 0: resuming the params download at chunk [3-9]", node_log)
    assert "refused a params chunk" not in node_log
    assert run["accepted"] >= rounds
