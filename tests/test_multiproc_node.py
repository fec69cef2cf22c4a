"""A `--nproc 2` node (native_node/distributed_trainer.py, DDP over gloo): one update per round."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench.multigpu import run_one


def test_nproc2_node_sends_one_update_per_round() -> None:
    with tempfile.TemporaryDirectory(prefix="daa-nproc-") as d:
        out = run_one(Path(d), model="mlp-digits", flavour=None, nproc=2, rounds=2, steps=4,
                      batch=16, lr=0.01, timeout=240, outer=[])
    assert out["rounds"] == 2
    assert out["updates_per_round"] == 1
    assert out["final_eval_loss"] > 0


def test_gpus_without_cuda_is_a_clear_error(capsys: object) -> None:
    import pytest
    import torch

    from native_node.__main__ import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["join", "--coordinator", "127.0.0.1:1", "--gpus", "2"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err  # type: ignore[attr-defined]


def test_two_processes_take_the_one_process_steps() -> None:
    """Same node id, same θ: every rank draws the one-process global batch and trains on its
    slice, weighted so DDP's average is the batch mean; the result differs by float rounding,
    far less than a node with another id (other batches) differs."""
    import numpy as np

    from ml.workload import initial_params, resolve
    from native_node.distributed_trainer import DistributedTrainer, rank_rows
    from native_node.trainer import Trainer

    assert [rank_rows(7, r, 2) for r in range(2)] == [slice(0, 4), slice(4, 7)]
    work = resolve(model="gpt-tiny", flavour="nano", data=None, data_path=None,
                   partition="iid", alpha=0.5, seed=0)
    theta = initial_params(work)
    kw: dict[str, Any] = {"steps": 6, "lr": 0.01, "batch_size": 7}  # uneven slices: 4 + 3
    one = Trainer(work, shard=0, n_shards=2, node_id="n1").train_round(theta, **kw)
    other = Trainer(work, shard=0, n_shards=2, node_id="n2").train_round(theta, **kw)
    dist = DistributedTrainer({"model": work.model_config, "data": work.data_spec.to_dict()},
                              shard=0, n_shards=2, node_id="n1", nproc=2, threads=2)
    try:
        two = dist.train_round(theta, **kw)
    finally:
        dist.close()
    assert one.train_loss is not None
    assert two.train_loss is not None
    assert abs(two.train_loss - one.train_loss) < 1e-5 * one.train_loss
    assert two.steps == one.steps == 6
    assert two.samples == one.samples
    split_gap = float(np.abs(two.delta - one.delta).max())
    seed_gap = float(np.abs(other.delta - one.delta).max())
    assert split_gap < 0.01 * seed_gap, (split_gap, seed_gap)  # 7e-5 vs 0.11 here
