"""server.eval_view: the eval model of a large run reads the params it evaluates in place
and gives the loss a copied-in model gives; modules with buffers are built the usual way."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ml.zoo import build_model, evaluate, flatten, load_flat, model_config
from server.eval_view import model_over


def test_views_share_the_params_and_give_the_same_loss() -> None:
    cfg = model_config("llama", "tiny", vocab_size=32)  # tied embeddings: one slot, two uses
    theta = flatten(build_model(cfg)) + np.float32(0.01)
    ro = np.frombuffer(theta.tobytes(), np.float32)  # read-only, as the server's params are
    view = model_over(lambda: build_model(cfg), ro)
    ref = build_model(cfg)
    load_flat(ref, ro)
    params = list(view.parameters())
    assert len(params) == len(list(ref.parameters()))
    assert all(np.shares_memory(p.detach().numpy(), ro) for p in params)
    assert flatten(view).tobytes() == ro.tobytes()
    context = cfg["context"]
    assert isinstance(context, int)
    x = np.random.default_rng(0).integers(0, 32, (6, context))
    assert evaluate(view, x, x) == evaluate(ref, x, x)


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("scale", torch.full((2,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x) * self.scale
        return out


def test_a_module_with_buffers_gets_a_copy_with_its_buffers() -> None:
    theta = np.arange(8, dtype=np.float32)
    model = model_over(WithBuffer, theta)
    assert isinstance(model, WithBuffer)
    assert model.scale.device.type == "cpu"
    assert model.scale.tolist() == [2.0, 2.0]
    assert flatten(model).tobytes() == theta.tobytes()
    assert not np.shares_memory(model.lin.weight.detach().numpy(), theta)
