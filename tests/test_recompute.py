"""ml.recompute: a trainer that recomputes its blocks' activations in the backward pass
trains to the same bits as one that keeps them, and keeps less memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.recompute import RECOMPUTE_MIN_PARAMS, recompute_blocks, wants_recompute
from ml.workload import Workload, resolve
from ml.zoo import build_model, model_config
from native_node.trainer import Trainer


@pytest.fixture(scope="module")
def work() -> Workload:
    return resolve(model="llama", flavour="tiny", data=None, data_path=None, partition="iid",
                   alpha=1.0, seed=0)


def _round(work: Workload, recompute: bool) -> tuple[np.ndarray, float | None]:
    trainer = Trainer(work, shard=0, n_shards=1, node_id="n", recompute=recompute)
    theta = np.concatenate([p.detach().reshape(-1).numpy() for p in trainer.model.parameters()])
    out = trainer.train_round(theta, steps=3, lr=1e-3, batch_size=2)
    return out.delta.copy(), out.train_loss


def test_recomputed_blocks_train_to_the_same_bits(work: Workload) -> None:
    plain, loss_plain = _round(work, recompute=False)
    again, loss_again = _round(work, recompute=True)
    assert np.any(plain != 0)
    assert plain.tobytes() == again.tobytes()
    assert loss_plain == loss_again


def test_recompute_saves_only_block_inputs() -> None:
    """Fewer tensors saved for backward: the blocks' insides are not kept."""
    cfg = model_config("llama", "tiny", vocab_size=64, seed=0)

    def saved(model: torch.nn.Module) -> int:
        count = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal count
            count += t.numel()
            return t

        x = torch.randint(0, 64, (2, 32))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
        return count

    plain = build_model(cfg)
    recomputed = build_model(cfg)
    assert recompute_blocks(recomputed)
    assert saved(recomputed) * 3 < saved(plain)
    with torch.no_grad():  # eval runs as before
        x = torch.randint(0, 64, (2, 32))
        assert torch.equal(plain(x), recomputed(x))


def test_recompute_defaults() -> None:
    tiny = build_model(model_config("llama", "tiny", vocab_size=64, seed=0))
    assert not wants_recompute(tiny, torch.device("cpu"))  # small: the plain backward
    mlp = build_model(model_config("mlp-digits", seed=1))
    assert not recompute_blocks(mlp)  # no blocks: nothing changed
    assert RECOMPUTE_MIN_PARAMS >= 10_000_000
