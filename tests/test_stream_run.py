"""Streamed updates in a real run: `python -m server --stream-chunk-mb 0.01` (chunks of 10 KiB,
so every mlp-digits update travels in several) and two native nodes on loopback. One node
reaches the server through a relay (bench.netfault) that closes its connection right after
the first chunk went through: the node reconnects, resubmits, and the server resumes the
transfer at the first chunk it has not verified. Rounds commit with streamed updates only,
and the server's spool keeps no file of a committed round."""

from __future__ import annotations

import re
from pathlib import Path

from bench.common import free_port, get_json
from bench.netfault import RelayThread
from tests.conftest import Procs, wait_for

CHUNK_MB = 0.01
CHUNK = int(CHUNK_MB * 2**20)
FAST = ("--model", "mlp-digits", "--inner-steps", "5", "--batch-size", "32",
        "--deadline-s", "30", "--quorum", "2")


def test_chunked_updates_commit_resume_after_a_cut_and_leave_no_spool(
        procs: Procs, tmp_path: Path) -> None:
    port, rounds, data = free_port(), 3, tmp_path / "run"
    base = f"http://127.0.0.1:{port}"
    procs.server("server", data, port, *FAST, "--rounds", str(rounds),
                 "--stream-chunk-mb", str(CHUNK_MB))
    wait_for(lambda: get_json(base + "/api/run"), 30, "the server")
    relay = RelayThread(upstream=f"127.0.0.1:{port}")
    relay_port = relay.start()
    try:
        relay.cut_after_upload(CHUNK)  # the first chunk frame through, then the socket closes
        procs.node("cut", relay_port)
        procs.node("direct", port)
        spool = data / "spool"
        seen_files: list[int] = []

        def finished() -> bool:
            if spool.exists():
                seen_files.append(len(list(spool.iterdir())))
            return bool(get_json(base + "/api/run")["status"] == "finished")

        wait_for(finished, 120, f"the run to finish (logs in {tmp_path})")
        assert relay.stats["cut_after_upload"] == 1
        assert relay.stats["connections"] >= 2  # the cut node came back
    finally:
        relay.stop()
    run = get_json(base + "/api/run")
    assert run["committed_rounds"] == rounds
    log = procs.log("server")
    first = re.search(r"streamed update from \w+ for round 0: (\d+) bytes", log)
    assert first is not None, log[-3000:]
    n_params = int(first[1]) // 4
    assert n_params * 4 > 2 * CHUNK  # several chunks per update
    # every accepted update of every round came streamed, and each was complete
    assert log.count("complete (accepted)") == 2 * rounds, log[-3000:]
    # the cut transfer resumed at a chunk > 0: the verified chunk did not travel again
    resumed = [int(k) for k in re.findall(r"resuming the streamed update of \w+ for round \d+ "
                                          r"at chunk (\d+)", log)]
    assert resumed
    assert all(k >= 1 for k in resumed)
    assert not any(run["rejected"].get(code) for code in
                   ("bad_chunk", "duplicate_chunk", "chunk_out_of_window", "foreign_chunk"))
    # the spool: at most one file per node at a time, nothing left after the last commit
    assert spool.is_dir()
    assert max(seen_files, default=0) <= 2
    assert list(spool.iterdir()) == []
    assert log.count("spool file(s) deleted") == rounds
