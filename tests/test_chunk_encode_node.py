"""Chunked encoding on a native node: the trainer's chunk source gives the bits of its whole
Δ, and a real server with real native nodes trains streamed rounds with the chunked path
(and a node with --no-chunk-encode beside it, on the one-shot path)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from bench.common import free_port, get_json
from bench.netfault import RelayThread
from ml.workload import resolve
from native_node.chunk_update import ParamsDelta
from native_node.trainer import Trainer
from tests.conftest import Procs, wait_for

CHUNK = 8192  # the run's stream chunk (bytes): its Chunk frames are the node's largest


@pytest.mark.parametrize("model", ["llama", "mlp-digits"])
def test_the_chunk_source_gives_the_bits_of_the_whole_delta(model: str) -> None:
    work = resolve(model=model, flavour="tiny" if model == "llama" else None, data=None,
                   data_path=None, partition="iid", alpha=0.5, seed=0)
    trainer = Trainer(work, shard=0, n_shards=1, node_id="n0")
    theta = np.random.default_rng(0).standard_normal(work.n_params).astype(np.float32) * 0.02
    result = trainer.train_round(theta, steps=2, lr=1e-2, batch_size=4, keep_base=True)
    assert result.delta.size == 0  # not made: read by chunks
    src = ParamsDelta(trainer.params)
    whole = src.whole()
    assert whole.size == work.n_params
    assert bool(np.any(whole != 0))
    step = 777  # chunks that cut across tensors
    parts = [src.read(lo, min(src.n, lo + step)) for lo in range(0, src.n, step)]
    assert src.reads == len(parts) > 10
    assert np.array_equal(np.concatenate(parts).view(np.uint32), whole.view(np.uint32))
    with pytest.raises(ValueError, match="chunk"):
        src.read(0, src.n + 1)
    src.release()
    assert not trainer.params.shared


@pytest.mark.timeout(150)
def test_a_streamed_run_trains_with_updates_encoded_by_chunks(procs: Procs,
                                                               tmp_path: Path) -> None:
    port, rounds = free_port(), 2
    base = f"http://127.0.0.1:{port}"
    procs.server("server", tmp_path / "run", port, "--model", "mlp-digits", "--inner-steps",
                 "5", "--batch-size", "32", "--deadline-s", "60", "--quorum", "2",
                 "--rounds", str(rounds), "--stream-chunk-mb", str(CHUNK / 2**20), "--codec",
                 "int8-block", "--error-feedback")
    wait_for(lambda: get_json(base + "/api/run"), 30, "the server")
    relay = RelayThread(upstream=f"127.0.0.1:{port}")
    relay_port = relay.start()
    try:  # the chunked node's socket closes after its first chunk: it resumes from the spool
        relay.cut_after_upload(CHUNK)  # its Hello (7.5 kB) and StreamSubmit are smaller
        procs.node("chunked", relay_port)
        procs.node("oneshot", port, "--no-chunk-encode")
        wait_for(lambda: get_json(base + "/api/run")["status"] == "finished", 120,
                 f"the run to finish (logs in {tmp_path})")
        assert relay.stats["cut_after_upload"] == 1
    finally:
        relay.stop()
    run = get_json(base + "/api/run")
    assert run["committed_rounds"] == rounds
    log = procs.log("server")
    assert log.count("complete (accepted)") == 2 * rounds, log[-3000:]  # all streamed
    chunked, oneshot = procs.log("chunked"), procs.log("oneshot")
    reads = [int(k) for k in re.findall(r"update encoded by chunks \((\d+) chunks", chunked)]
    assert len(reads) == rounds, chunked[-3000:]  # the path was taken, each round
    assert all(k >= 2 for k in reads)  # the finiteness pass and the encoding pass at least
    spooled = re.findall(r"streaming the update from its spool \((\d+) bytes in (\d+) chunks",
                         chunked)
    assert len(spooled) == rounds + 1  # announced again after the cut
    resumed = re.findall(r"resuming the streamed update of \w+ for round \d+ at chunk (\d+)",
                         log)
    assert resumed
    assert all(int(k) >= 1 for k in resumed)  # what was verified did not travel again
    assert all(int(n) >= 2 for _, n in spooled)  # 8 KiB chunks of the int8 update
    assert "update encoded by chunks" not in oneshot
    sent = re.findall(r"streaming the update \((\d+) bytes", oneshot)  # same codec, size
    assert sent == [size for size, _ in spooled][:rounds]
    # the last commit cleared the journal: no spool file is left on the node
    wait_for(lambda: not list((tmp_path / "chunked" / "spool").glob("*")), 20,
             "the node's spool to be emptied")
    assert not any(run["rejected"].get(code) for code in
                   ("bad_chunk", "duplicate_chunk", "chunk_out_of_window", "foreign_chunk"))


@pytest.mark.timeout(150)
def test_a_spooled_update_survives_a_restart_of_its_node(procs: Procs, tmp_path: Path) -> None:
    """A node killed after its chunked update was taken, before the round commits: at its
    restart the journal names the spool file, the update is checked against it and sent
    again from it (the server already has it: a duplicate), never trained again."""
    port, rounds = free_port(), 2
    base = f"http://127.0.0.1:{port}"
    procs.server("server", tmp_path / "run", port, "--model", "mlp-digits", "--inner-steps",
                 "5", "--batch-size", "32", "--deadline-s", "90", "--quorum", "2",
                 "--rounds", str(rounds), "--stream-chunk-mb", str(CHUNK / 2**20), "--codec",
                 "int8-block", "--error-feedback")
    wait_for(lambda: get_json(base + "/api/run"), 30, "the server")
    first = procs.node("a", port)  # alone: round 0 waits for a second node (quorum 2)
    wait_for(lambda: "update accepted" in procs.log("a"), 60, "a's update to be taken")
    first.kill()  # (its own session: the node process itself)
    first.wait(10)
    entry = json.loads((tmp_path / "a" / "pending.json").read_text())
    spool = Path(entry["spool"])
    assert entry["spooled"]["round"] == 0
    assert spool.parent == tmp_path / "a" / "spool"
    assert spool.stat().st_size == entry["spooled"]["size"]
    procs.node("a2", port, "--state-dir", str(tmp_path / "a"))
    wait_for(lambda: "survived the restart" in procs.log("a2"), 60, "a's restart")
    procs.node("b", port)
    wait_for(lambda: get_json(base + "/api/run")["status"] == "finished", 90,
             f"the run to finish (logs in {tmp_path})")
    log = procs.log("a2")
    assert "round 0: resubmitting the update trained before the reconnect" in log, log[-3000:]
    assert "streaming the update from its spool" in log
    # the server kept the update (a duplicate), or had dropped it with the connection
    assert re.search(r"round 0: update (duplicate|accepted)", log), log[-3000:]
    assert len(re.findall(r"round 0: \d+ steps", log)) == 0  # never trained again
    assert get_json(base + "/api/run")["committed_rounds"] == rounds
    wait_for(lambda: not list(spool.parent.glob("*")), 20,  # the journal cleared: the
             "the node's spool to be emptied")  # spool emptied (at the last commit)
