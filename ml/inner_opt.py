"""The inner optimizer: torch.optim.AdamW's single-tensor update, written out.

Constructing any `torch.optim` optimizer imports `torch._dynamo` (1-2 s of CPU on this machine,
measured: 1.9 s under load), which was most of a restarted node's first round (bench.chaos,
node_rejoin_s). This class does the same arithmetic in the same order as torch's
`_single_tensor_adamw` (the path torch takes for CPU tensors; on CUDA torch would take the
foreach path, equal up to rounding), with the constants the ONNX train-step graph bakes in
(server/onnx_export.py INNER_ADAMW); tests/test_inner_opt.py checks it bit for bit against
torch.optim.AdamW.

`make_inner_opt` picks the optimizer for a trainer: this class on CPU for the zoo's small
models, torch's fused AdamW (one kernel over all parameters) on CUDA and for models of
`FUSED_MIN_PARAMS` parameters or more, where a Python loop over tensors costs more than the
import it saves. Both take the same hyper-parameters and expose `lr`, `zero_grad` and `step`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

import torch

BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.01
FUSED_MIN_PARAMS = 50_000_000  # from here on (or on CUDA) the inner steps use torch's fused AdamW


class InnerOpt(Protocol):
    lr: float

    def zero_grad(self) -> None: ...

    def step(self) -> None: ...


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


class FusedAdamW:
    """torch.optim.AdamW(fused=True) behind `InnerAdamW`'s small interface (`lr` settable)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], *, lr: float,
                 betas: tuple[float, float] = BETAS, eps: float = EPS,
                 weight_decay: float = WEIGHT_DECAY) -> None:
        self.opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, betas=betas,
                                     eps=eps, weight_decay=weight_decay, fused=True)

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = value

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.opt.step()


def make_inner_opt(params: Iterable[torch.nn.Parameter], *, lr: float, device: torch.device,
                   betas: tuple[float, float] = BETAS, weight_decay: float = WEIGHT_DECAY,
                   fused: bool | None = None) -> InnerOpt:
    """The inner AdamW for a trainer; `fused=None` decides from the device and model size."""
    plist = list(params)
    if fused is None:
        fused = device.type == "cuda" or sum(p.numel() for p in plist) >= FUSED_MIN_PARAMS
    if fused:
        return FusedAdamW(plist, lr=lr, betas=betas, weight_decay=weight_decay)
    return InnerAdamW(plist, lr=lr, betas=betas, weight_decay=weight_decay)
