"""A `--nproc 2` node (native_node/distributed_trainer.py, DDP over gloo): one update per round."""

from __future__ import annotations

import tempfile
from pathlib import Path

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
