"""bench.simulate --engine ray (bench.sim_ray): the same participants and coordinator, the
participants on Ray workers. Skipped with a reason where ray is not installed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.proctree import PeakSampler, tree_rss_mb
from bench.sim_ray import ray_missing, simulate_ray
from bench.simulate import main, simulate

NO_RAY = ray_missing()


@pytest.mark.skipif(NO_RAY is not None, reason=NO_RAY or "")
def test_ray_engine_commits_the_same_rounds_as_the_asyncio_engine(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Same seed, same nodes (one sign-flip attacker): the ray engine's participants, spread
    over two workers, produce the very rounds the one-process engine commits."""
    assert main(["--engine", "ray", "--workers", "2", "--nodes", "6", "--rounds", "2",
                 "--inner-steps", "3", "--byzantine", "0.2", "--attack", "sign-flip",
                 "--seed", "3", "--data-dir", str(tmp_path / "ray"), "--quiet",
                 "--torch-threads", "0"]) == 0  # 0: leave this process's torch threads
    out = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(out[-1])
    assert figures["engine"] == "ray"
    assert figures["workers"] == 2
    assert figures["nodes"] == 6
    assert figures["rounds"] == 2
    assert figures["byzantine"] == 1
    assert figures["peak_rss_mb"] > 0
    table = [line.split("|") for line in out if line.split("|")[0].strip() in ("0", "1")]
    assert [int(r[4]) for r in table] == [6, 6]  # n_updates: every node's update, each round
    assert [int(r[6]) for r in table] == [0, 0]  # none rejected
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray workers train: the same kernels, the same bits
    try:
        ref = asyncio.run(simulate(nodes=6, rounds=2, byzantine=0.2, attack="sign-flip",
                                   aggregator="median", inner_steps=3, seed=3,
                                   data_dir=tmp_path / "one", progress=False))
    finally:
        torch.set_num_threads(threads)
    assert figures["final_eval_loss"] == ref["summary"]["final_eval_loss"]
    assert figures["final_accuracy"] == ref["summary"]["final_accuracy"]


@pytest.mark.parametrize(("kw", "match"), [
    ({"byzantine": 0.5, "attack": "alie"}, "honest update in one place"),
    ({"result_codec": "fp16"}, "asyncio engine only"),
])
def test_ray_engine_refuses_what_it_cannot_run_before_starting_ray(
        kw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        asyncio.run(simulate_ray(nodes=4, rounds=1, progress=False, **kw))  # type: ignore[arg-type]


def test_tree_memory_counts_child_processes() -> None:
    code = "import time; b = bytearray(120 * 2**20); b[::4096] = b'x' * len(b[::4096]); " \
           "print('ok', flush=True); time.sleep(30)"
    with PeakSampler(os.getpid(), every_s=0.05) as mem:
        before = tree_rss_mb(os.getpid())
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        try:
            assert child.stdout is not None
            assert child.stdout.readline().startswith(b"ok")
            time.sleep(0.2)
            during = tree_rss_mb(os.getpid())
        finally:
            child.kill()
            child.wait()
    assert during - before > 100
    assert mem.peak >= during - 1
