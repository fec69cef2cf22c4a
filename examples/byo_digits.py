"""A bring-your-own model for the digits data (docs/byo_model.md walks through it).

Run it:  python -m server --model examples.byo_digits:build --data digits
         python -m native_node join --coordinator ws://HOST:PORT/ws \\
             --allow-model examples.byo_digits:build

Two hidden layers with LayerNorm and a residual connection, trained with label-smoothed
cross-entropy. Written the way docs/onnx.md asks, so that its train step exports for tabs:
linears as ``x @ W.t() + b`` (an ``nn.Linear`` fixes the batch dimension under the export's
tracing), the loss through an explicit one-hot (``F.cross_entropy`` exports a wrong
backward), every parameter float32 and seeded from ``config["seed"]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ml.byo import BatchSpec, ModelSpec

SMOOTHING = 0.05  # label smoothing of the loss


class ResidualMLP(nn.Module):
    """[B, n_inputs] -> LayerNorm -> Linear -> GELU -> (+ Linear -> GELU) -> Linear -> logits."""

    def __init__(self, n_inputs: int, hidden: int, n_classes: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)

        def uniform(*shape: int, fan_in: int) -> nn.Parameter:
            bound = 1.0 / math.sqrt(fan_in)
            return nn.Parameter((torch.rand(shape, generator=gen) * 2.0 - 1.0) * bound)

        self.ln_w = nn.Parameter(torch.ones(n_inputs))
        self.ln_b = nn.Parameter(torch.zeros(n_inputs))
        self.w1 = uniform(hidden, n_inputs, fan_in=n_inputs)
        self.b1 = uniform(hidden, fan_in=n_inputs)
        self.w2, self.b2 = uniform(hidden, hidden, fan_in=hidden), uniform(hidden, fan_in=hidden)
        self.w3 = uniform(n_classes, hidden, fan_in=hidden)
        self.b3 = uniform(n_classes, fan_in=hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x, (x.shape[-1],), self.ln_w, self.ln_b)
        h = F.gelu(x @ self.w1.t() + self.b1)
        h = h + F.gelu(h @ self.w2.t() + self.b2)  # the residual
        return h @ self.w3.t() + self.b3


def smoothed_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean label-smoothed cross-entropy (nats), via an explicit one-hot."""
    n = logits.shape[-1]
    onehot = (y[..., None] == torch.arange(n, device=logits.device)).to(logits.dtype)
    target = onehot * (1.0 - SMOOTHING) + SMOOTHING / n
    return -(torch.log_softmax(logits, dim=-1) * target).sum(-1).mean()


def build(config: dict[str, Any]) -> ModelSpec:
    """The factory: ``config`` carries seed, task and the data's sizes (n_inputs, n_classes)."""
    if config["task"] != "classify":
        raise ValueError(f"byo_digits classifies; this run's data is {config['task']!r}")
    hidden = 96
    n_in, n_out = int(config["n_inputs"]), int(config["n_classes"])
    model = ResidualMLP(n_in, hidden, n_out, int(config["seed"]))
    batch = BatchSpec(task="classify", x_shape=(n_in,), y_shape=(), out_shape=(n_out,))
    return ModelSpec(module=model, batch=batch, loss=smoothed_cross_entropy)
