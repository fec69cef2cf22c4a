"""Validation with streamed updates (validation with stream_chunk_mb): spooled candidates are
scored from their files by the server's probe and a bad one is excluded like a one-frame one
(typed error to its sender, counter, recorded reason); a run of real native nodes (two
trainers, one validator) with every update streamed commits, the validator is not sent the
streamed candidates (the server scores them alone, counted and logged)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from bench.common import free_port, get_json
from bench.secagg_run import until
from server.config import RunConfig
from tests.conftest import Procs, wait_for
from tests.test_stream_secagg import streaming_run


def test_run_config_takes_validation_with_streamed_updates() -> None:
    cfg = RunConfig(validation=True, stream_chunk_mb=1.0)
    assert cfg.stream_chunk == 2**20


async def test_a_bad_streamed_update_is_scored_from_the_spool_and_excluded(
        tmp_path: Path) -> None:
    async with streaming_run(tmp_path, 3, quorum=2, validation=True,
                             validation_samples=64) as (coord, lives):
        await until(lambda: all(lv.trains for lv in lives), "the round")
        n = coord.run.n_params
        rng = np.random.default_rng(0)
        honest = [rng.uniform(-1e-3, 1e-3, n).astype(np.float32) for _ in range(2)]
        bad = (rng.standard_normal(n) * 5).astype(np.float32)
        for lv, d in zip(lives, [*honest, bad], strict=True):
            await lv.train(d)
        await until(lambda: coord.run.version == 1, "the commit")
        await until(lambda: bool(lives[2].errors), "the rejection")
        assert all(lv.streamed == 1 for lv in lives)
        assert coord.counters["stream_completed"] == 3
        assert [c for c, _ in lives[2].errors] == ["update_rejected"]
        assert lives[0].errors == lives[1].errors == []
        assert coord.rejected["update_rejected"] == 1
        recs = coord.run.store.rejections()
        assert [(r["node_id"], r["validators"]) for r in recs] == [
            (lives[2].part.node_id, ["server"])]
        assert "held-out loss" in recs[0]["reason"]
        assert sorted(coord.run.store.update_keys(0)) == sorted(
            lv.part.node_id for lv in lives[:2])
        assert all(v is not None for v in coord.validation.scores.values())
        assert len(coord.validation.scores) == 3


CHUNK_MB = 0.01
FAST = ("--model", "mlp-digits", "--inner-steps", "5", "--batch-size", "32",
        "--deadline-s", "30", "--quorum", "2")


def test_a_streamed_validation_run_of_native_nodes_commits(procs: Procs, tmp_path: Path
                                                           ) -> None:
    port, rounds, data = free_port(), 2, tmp_path / "run"
    base = f"http://127.0.0.1:{port}"
    procs.server("server", data, port, *FAST, "--rounds", str(rounds), "--validation",
                 "--stream-chunk-mb", str(CHUNK_MB))
    wait_for(lambda: get_json(base + "/api/run"), 30, "the server")
    procs.start("validator", ["-m", "native_node", "up", "--role", "validator",
                              "--coordinator", f"127.0.0.1:{port}", "--state-dir",
                              str(tmp_path / "validator"), "--threads", "1", "--quiet"])
    wait_for(lambda: any(n.get("role") == "validator"
                         for n in get_json(base + "/api/peers")), 60, "the validator")
    procs.node("a", port)
    procs.node("b", port)
    wait_for(lambda: get_json(base + "/api/run")["status"] == "finished", 120,
             f"the run to finish (logs in {tmp_path})")
    run = get_json(base + "/api/run")
    assert run["committed_rounds"] == rounds
    log = procs.log("server")
    first = re.search(r"streamed update from \w+ for round 0: (\d+) bytes", log)
    assert first is not None, log[-3000:]
    assert int(first[1]) > 2 * CHUNK_MB * 2**20  # several chunks per update
    assert log.count("complete (accepted)") == 2 * rounds, log[-3000:]
    assert len(re.findall(r"2 streamed candidate\(s\) scored by the server alone", log)) \
        == rounds, log[-3000:]
    assert not run["rejected"].get("update_rejected")
