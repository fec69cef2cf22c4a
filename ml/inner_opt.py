"""The inner optimizer: torch.optim.AdamW's single-tensor update, written out.

Constructing any `torch.optim` optimizer imports `torch._dynamo` (1-2 s of CPU on this machine,
measured: 1.9 s under load), which was most of a restarted node's first round (bench.chaos,
node_rejoin_s). This class does the same arithmetic in the same order as torch's
`_single_tensor_adamw` (the path torch takes for CPU tensors; on CUDA torch would take the
foreach path, equal up to rounding), with the constants the ONNX train-step graph bakes in
(server/onnx_export.py INNER_ADAMW); tests/test_inner_opt.py checks it bit for bit against
torch.optim.AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.01


class InnerAdamW:
    def __init__(self, params: Iterable[torch.nn.Parameter], *, lr: float,
                 betas: tuple[float, float] = BETAS, eps: float = EPS,
                 weight_decay: float = WEIGHT_DECAY) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format)
                        for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format)
                           for p in self.params]
        self.steps = 0  # updates taken (torch keeps one per parameter; all move together here)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        lr = self.lr
        bias_correction1 = 1 - beta1 ** self.steps
        bias_correction2 = 1 - beta2 ** self.steps
        step_size = lr / bias_correction1
        bias_correction2_sqrt = math.sqrt(bias_correction2)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            g = p.grad
            if g is None:
                continue
            p.mul_(1 - lr * self.weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)
