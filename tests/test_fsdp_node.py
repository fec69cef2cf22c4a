"""`--shard full`: the multi-process node with FSDP2 fully_shard (native_node/sharding.py,
native_node/distributed_trainer.py), over gloo on CPU."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from native_node.sharding import needs_sharding, shard_ranges


def test_shard_ranges_tile_the_flat_vector() -> None:
    shapes = [(3, 16), (3,), (1,), (5, 2, 2), (2,)]
    total = sum(int(np.prod(s)) for s in shapes)
    for world in (1, 2, 3, 4):
        pieces = sorted(r for rank in range(world) for r in shard_ranges(shapes, rank, world)
                        if r[1] > 0)
        ends = [0] + [o + n for o, n in pieces]
        assert [o for o, _ in pieces] == ends[:-1]
        assert ends[-1] == total
    # torch.chunk's split: ceil(3 / 2) = 2 rows to rank 0, 1 to rank 1; (1,) all to rank 0
    assert shard_ranges(shapes, 0, 2)[:3] == [(0, 32), (48, 2), (51, 1)]
    assert shard_ranges(shapes, 1, 2)[:3] == [(32, 16), (50, 1), (52, 0)]


def test_auto_shards_only_what_would_not_fit() -> None:
    gib = 1 << 30
    assert not needs_sharding(125_000_000, 80 * gib)  # 2 GB of state on an 80 GB card
    assert needs_sharding(7_000_000_000, 80 * gib)  # 112 GB of state
    assert needs_sharding(1_000_000_000, 16 * gib)  # 16 GB + headroom on a 16 GB card


def test_shard_full_needs_several_processes(capsys: Any) -> None:
    from native_node.__main__ import main

    assert main(["join", "--coordinator", "127.0.0.1:1", "--shard", "full"]) == 2
    assert "--shard full needs --nproc N or --gpus N" in capsys.readouterr().err


def test_fsdp_takes_the_one_process_steps_with_half_the_state() -> None:
    """Same node id, same θ: FSDP's round equals one process's up to rounding (far less than
    another node id's batches move it); each rank holds half of the parameters, gradients and
    AdamW moments; Δ comes back whole."""
    from ml.workload import initial_params, resolve
    from native_node.distributed_trainer import DistributedTrainer
    from native_node.trainer import Trainer

    work = resolve(model="gpt-tiny", flavour="nano", data=None, data_path=None,
                   partition="iid", alpha=0.5, seed=0)
    theta = initial_params(work)
    kw: dict[str, Any] = {"steps": 6, "lr": 0.01, "batch_size": 7}  # uneven slices: 4 + 3
    trainer = Trainer(work, shard=0, n_shards=2, node_id="n1")
    one = trainer.train_round(theta, **kw)
    one2 = trainer.train_round(theta - one.delta, **kw)  # AdamW state carried over
    other = Trainer(work, shard=0, n_shards=2, node_id="n2").train_round(theta, **kw)
    dist = DistributedTrainer({"model": work.model_config, "data": work.data_spec.to_dict()},
                              shard=0, n_shards=2, node_id="n1", nproc=2, threads=2,
                              sharding="full")
    try:
        two = dist.train_round(theta, **kw)
        two2 = dist.train_round(theta - one.delta, **kw)
    finally:
        dist.close()
    assert dist.sharded is True
    assert one.train_loss is not None
    assert two.train_loss is not None
    assert abs(two.train_loss - one.train_loss) < 1e-5 * one.train_loss
    assert (two.steps, two.samples) == (one.steps, one.samples) == (6, 42)
    assert two.delta.shape == theta.shape
    assert two.delta.dtype == np.float32
    seed_gap = float(np.abs(other.delta - one.delta).max())
    for a, b in ((two, one), (two2, one2)):
        split_gap = float(np.abs(a.delta - b.delta).max())
        assert split_gap < 0.01 * seed_gap, (split_gap, seed_gap)  # ~6e-5 vs 0.11 here
    n = work.n_params
    assert sum(m["state"] for m in dist.memory) == 16 * n  # params, grads, 2 moments: float32
    assert max(m["state"] for m in dist.memory) <= 0.55 * 16 * n  # each rank about half


def test_fsdp_node_joins_a_real_server() -> None:
    """`join --nproc 2 --shard full` against the real server: rounds commit, one update each."""
    from bench.multigpu import run_one

    with tempfile.TemporaryDirectory(prefix="daa-fsdp-") as d:
        out = run_one(Path(d), model="mlp-digits", flavour=None, nproc=2, rounds=2, steps=4,
                      batch=16, lr=0.01, timeout=240, outer=[], shard="full")
        log = (Path(d) / "node.log").read_text()
    assert out["rounds"] == 2
    assert out["updates_per_round"] == 1
    assert out["final_eval_loss"] > 0
    assert "inner steps over 2 processes: FSDP" in log
