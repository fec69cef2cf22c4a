"""Inner loop: H AdamW steps with torch from the global params; returns the pseudo-gradient."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from ml.data import BatchSampler, shard_indices
from ml.inner_opt import InnerAdamW
from ml.workload import Workload
from ml.zoo import flatten, load_flat, loss_fn


@dataclass(frozen=True, kw_only=True)
class RoundResult:
    delta: np.ndarray  # pseudo-gradient theta_r - theta_i (float32)
    train_loss: float | None  # mean inner loss over the round
    samples: int  # samples consumed
    compute_s: float  # seconds in forward/backward/optimizer
    steps: int  # steps completed


def pick_device(requested: str = "auto") -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {requested}: CUDA is not available on this machine")
    return requested


class Trainer:
    """Owns the local model, its shard sampler and the inner AdamW state across rounds."""

    def __init__(self, work: Workload, *, shard: int, n_shards: int, node_id: str,
                 device: str = "cpu") -> None:
        self.work = work
        self.device = torch.device(device)
        self.model = work.new_model().to(self.device)
        ds, spec = work.dataset, work.data_spec
        self.indices = shard_indices(ds.keys_train, n_shards=n_shards, shard=shard,
                                     partition=spec.partition, alpha=spec.alpha, seed=spec.seed)
        self.seed = int.from_bytes(hashlib.sha256(node_id.encode()).digest()[:4], "little")
        self.sampler: BatchSampler | None = None
        self.opt: InnerAdamW | None = None

    def _batches(self, batch_size: int) -> BatchSampler:
        if self.sampler is None or self.sampler.batch_size != batch_size:
            ds = self.work.dataset
            self.sampler = BatchSampler(ds.x_train, ds.y_train, self.indices,
                                        batch_size=batch_size, seed=self.seed)
        return self.sampler

    def train_round(self, theta: np.ndarray, *, steps: int, lr: float, batch_size: int,
                    cancel: threading.Event | None = None,
                    progress: Callable[[int, float], None] | None = None) -> RoundResult:
        """Load theta, run up to `steps` inner steps (stops early if `cancel` is set)."""
        load_flat(self.model, theta)
        if self.opt is None:
            self.opt = InnerAdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95),
                                  weight_decay=0.01)
        self.opt.lr = lr
        sampler = self._batches(batch_size)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if self.device.type == "cuda" else nullcontext())
        self.model.train()
        losses: list[float] = []
        compute = 0.0
        done = 0
        for step in range(steps):
            if cancel is not None and cancel.is_set():
                break
            xb, yb = sampler.sample()
            t0 = time.perf_counter()
            x = torch.from_numpy(np.ascontiguousarray(xb)).to(self.device)
            y = torch.from_numpy(np.ascontiguousarray(yb)).to(self.device)
            with autocast:
                loss = loss_fn(self.model(x), y)
            self.opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            value = float(loss.detach())
            compute += time.perf_counter() - t0
            losses.append(value)
            done = step + 1
            if progress is not None:
                progress(done, value)
        delta = (theta.astype(np.float32) - flatten(self.model)).astype(np.float32)
        mean = float(np.mean(losses)) if losses else None
        return RoundResult(delta=delta, train_loss=mean if mean is None or np.isfinite(mean)
                           else None, samples=done * batch_size, compute_s=compute, steps=done)
