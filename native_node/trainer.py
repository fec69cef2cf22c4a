"""Inner loop: H AdamW steps with torch from the global params; returns the pseudo-gradient.

On CUDA the forward pass and loss run under bf16 autocast (weights, gradients and optimizer
state stay float32), the inner optimizer is torch's fused AdamW (ml/inner_opt.make_inner_opt),
θ_r stays on the device and the pseudo-gradient Δ = θ_r − θ_H is computed there and copied
once into pinned host memory (`DeviceParams`). On CPU the same code runs without autocast or
pinning, with the written-out single-tensor AdamW for the zoo's small models.
"""

from __future__ import annotations

import hashlib
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ml import memory
from ml.data import BatchSampler, shard_indices
from ml.inner_opt import InnerOpt, make_inner_opt
from ml.recompute import recompute_blocks, wants_recompute
from ml.workload import Workload
from ml.zoo import loss_for


@dataclass(frozen=True, kw_only=True)
class RoundResult:
    delta: np.ndarray  # pseudo-gradient theta_r - theta_i (float32; empty with keep_base)
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


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA (matmuls in bf16, the rest as torch decides); nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class DeviceParams:
    """θ_r kept on the model's device (on CPU: the participant's own array, not a copy), and
    Δ = θ_r − θ_H brought back through one host buffer (pinned on CUDA, so the copy is one
    DMA rather than a staged copy per tensor)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.params = list(model.parameters())
        self.n = n = sum(p.numel() for p in self.params)
        # θ_r: on CUDA a device buffer; on CPU the caller's own array, shared (set_theta)
        self.theta = torch.zeros(n if device.type == "cuda" else 0, dtype=torch.float32,
                                 device=device)
        self.shared = False  # self.theta is a view of the caller's array: never written
        # CUDA: Δ comes back through one pinned host buffer; on CPU Δ is handed out as is
        self.host = (torch.empty(n, dtype=torch.float32, pin_memory=True)
                     if device.type == "cuda" else None)

    def own(self) -> torch.Tensor:
        """θ's own buffer, to write into (a shared view is let go first, never written)."""
        if self.shared or self.theta.numel() != self.n:
            self.theta = torch.empty(self.n, dtype=torch.float32, device=self.device)
            self.shared = False
        return self.theta

    def set_theta(self, theta: np.ndarray) -> None:
        """θ_r from the participant (float32, the flat manifest order). On CPU the array
        itself becomes the base Δ is taken against (no second copy of the model: the
        participant holds θ_r anyway; it is only read, so a read-only view of the
        RoundOpen's bytes will do, and the caller must not write it until `delta`); on
        CUDA it is copied to the device."""
        arr = np.ascontiguousarray(theta, dtype=np.float32)
        if arr.size != self.n:
            raise ValueError(f"params of {arr.size} values for a model of {self.n}")
        with warnings.catch_warnings():  # torch warns on a non-writable array; only read
            warnings.simplefilter("ignore", UserWarning)
            src = torch.from_numpy(arr)
        if self.device.type == "cpu":
            self.theta, self.shared = src, True
        else:
            self.own().copy_(src)

    def release(self) -> None:
        """Let a shared θ_r go (its Δ is taken): the caller may then replace or update its
        array (the next RoundOpen) while no reference here keeps the old one alive."""
        if self.shared:
            self.theta, self.shared = torch.zeros(0, dtype=torch.float32), False

    @torch.no_grad()
    def to_model(self) -> None:
        """Copy θ_r into the model's parameters."""
        offset = 0
        for p in self.params:
            n = p.numel()
            p.copy_(self.theta[offset:offset + n].view_as(p))
            offset += n

    @torch.no_grad()
    def flat(self) -> torch.Tensor:
        """The model's params now, as one float32 vector (manifest order)."""
        return torch.cat([p.detach().reshape(-1).float() for p in self.params])

    @torch.no_grad()
    def hold_current(self) -> None:
        """The model's params now become the base Δ is taken against (steps run ahead)."""
        own, offset = self.own(), 0
        for p in self.params:
            n = p.numel()
            own[offset:offset + n].copy_(p.detach().reshape(-1))
            offset += n

    @torch.no_grad()
    def merge(self, new: np.ndarray) -> None:
        """Overlap (shared.overlap.merge): the model's params become new + (now − base), in
        float32, and `new` becomes the base; so Δ is then taken against `new`."""
        src = torch.from_numpy(np.ascontiguousarray(new, dtype=np.float32)).to(self.device)
        merged = src + (self.flat() - self.theta)
        self.own().copy_(src)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.copy_(merged[offset:offset + n].view_as(p))
            offset += n

    @torch.no_grad()
    def delta(self) -> np.ndarray:
        """Δ = θ_r − θ_H as a new float32 array (on CPU the one the subtraction wrote: at
        125M params every copy of Δ is 0.5 GB)."""
        flat = torch.cat([p.detach().reshape(-1).float() for p in self.params])
        torch.sub(self.theta, flat, out=flat)
        if self.host is None:
            return flat.numpy()
        self.host.copy_(flat, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return self.host.numpy().copy()


class Rebase:
    """The mailbox of steps run ahead (run option overlap): the event loop puts the new
    round's params; the training thread merges them at its next step, or once at its end."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: np.ndarray | None = None  # put, not yet merged by the thread
        self.round: int | None = None  # the round the steps became (set by `put`)
        self.merged = False  # the thread merged them (then its Δ is against them)
        self.merged_between = False  # ... between two steps, not once at the end
        self.closed = False  # the thread is done: a later `put` must merge after the fact

    def put(self, round_: int, theta: np.ndarray) -> bool:
        """The params of `round_`; False when the thread has already finished."""
        with self.lock:
            self.round = round_
            if self.closed:
                self.pending = theta
                return False
            self.pending = theta
            return True

    def take(self, *, close: bool = False) -> np.ndarray | None:
        with self.lock:
            theta, self.pending = self.pending, None
            self.closed = self.closed or close
            self.merged = self.merged or theta is not None
            self.merged_between = self.merged_between or (theta is not None and not close)
            return theta


class Trainer:
    """Owns the local model, its shard sampler and the inner AdamW state across rounds."""

    def __init__(self, work: Workload, *, shard: int, n_shards: int, node_id: str,
                 device: str = "cpu", recompute: bool | None = None) -> None:
        self.work = work
        self.device = torch.device(device)
        self.model = work.new_model().to(self.device)
        # recompute the blocks' activations in the backward pass (ml.recompute; None: on
        # CPU for large models, where they are ~1 GB of a 125M node's peak)
        if recompute if recompute is not None else wants_recompute(self.model, self.device):
            recompute_blocks(self.model)
        ds, spec = work.dataset, work.data_spec
        self.indices = shard_indices(ds.keys_train, n_shards=n_shards, shard=shard,
                                     partition=spec.partition, alpha=spec.alpha, seed=spec.seed)
        self.seed = int.from_bytes(hashlib.sha256(node_id.encode()).digest()[:4], "little")
        self.sampler: BatchSampler | None = None
        self.opt: InnerOpt | None = None
        self.params = DeviceParams(self.model, self.device)

    def _batches(self, batch_size: int) -> BatchSampler:
        if self.sampler is None or self.sampler.batch_size != batch_size:
            ds = self.work.dataset
            self.sampler = BatchSampler(ds.x_train, ds.y_train, self.indices,
                                        batch_size=batch_size, seed=self.seed)
        return self.sampler

    def train_round(self, theta: np.ndarray | None, *, steps: int, lr: float, batch_size: int,
                    cancel: threading.Event | None = None,
                    progress: Callable[[int, float], None] | None = None,
                    rebase: Rebase | None = None, keep_base: bool = False) -> RoundResult:
        """Load theta, run up to `steps` inner steps (stops early if `cancel` is set).
        theta None: go on from the model's params (steps run ahead), merging what `rebase`
        gets between steps and at the end (shared.overlap). `keep_base`: Δ is not made
        (the result's is empty) and θ_r stays held: the caller reads Δ a chunk at a time
        (native_node.chunk_update.ParamsDelta), then calls `params.release()`."""
        if theta is None:
            self.params.hold_current()
        else:
            self.params.set_theta(theta)
            self.params.to_model()
        if self.opt is None:
            self.opt = make_inner_opt(self.model.parameters(), lr=lr, betas=(0.9, 0.95),
                                      weight_decay=0.01, device=self.device)
        self.opt.lr = lr
        sampler = self._batches(batch_size)
        self.model.train()
        losses: list[float] = []
        compute = 0.0
        done = 0
        for step in range(steps):
            if cancel is not None and cancel.is_set():
                break
            if rebase is not None and (new := rebase.take()) is not None:
                self.params.merge(new)
            xb, yb = sampler.sample()
            t0 = time.perf_counter()
            x = torch.from_numpy(np.ascontiguousarray(xb)).to(self.device)
            y = torch.from_numpy(np.ascontiguousarray(yb)).to(self.device)
            # the last step's gradients go before the forward pass, whose buffers then reuse
            # their memory (on CPU: freed heap that glibc keeps; ~170 MB less at 125m)
            self.opt.zero_grad()
            with autocast(self.device):
                loss = loss_for(self.model)(self.model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            value = float(loss.detach())
            compute += time.perf_counter() - t0
            losses.append(value)
            done = step + 1
            if progress is not None:
                progress(done, value)
        self.opt.zero_grad()  # the gradients are not needed while Δ is encoded and sent
        memory.trim()  # nor the steps' freed buffers (ml.memory)
        if rebase is not None and (new := rebase.take(close=True)) is not None:
            self.params.merge(new)
        delta = np.empty(0, dtype=np.float32) if keep_base else self.params.delta()
        if not keep_base:
            self.params.release()
        mean = float(np.mean(losses)) if losses else None
        return RoundResult(delta=delta, train_loss=mean if mean is None or np.isfinite(mean)
                           else None, samples=done * batch_size, compute_s=compute, steps=done)

    def merge_after(self, theta: np.ndarray) -> np.ndarray:
        """Steps run ahead that ended before their round opened: merge `theta` now and
        return Δ against it (shared.overlap.pseudo_gradient)."""
        self.params.merge(theta)
        return self.params.delta()
