"""A native node's pseudo-gradient a chunk at a time, and its spool files (chunked encoding:
shared.chunk_encode, shared.chunk_submit).

`ParamsDelta` is the `DeltaSource` of a trained round: Δ[lo:hi] = θ_r[lo:hi] − θ_H[lo:hi]
computed from the round's base params (`DeviceParams.theta`: the participant's own array on
CPU, a device buffer on CUDA) and the model's parameters, tensor by tensor, on the model's
device; only the chunk comes to the host. The same float32 subtraction as
`DeviceParams.delta`, so the same bits. The base stays held until `release` (after the
participant has encoded the update).

Spool files live in `<state dir>/spool/`, one per pending update: a new one removes the
others (older updates, never resubmitted again), a cleared journal removes them all.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from native_node.trainer import DeviceParams
from shared.chunk_encode import FileSpool

SUFFIX = ".spool"


class ParamsDelta:
    """Δ of the round just trained, read a chunk at a time (see the module doc)."""

    def __init__(self, params: DeviceParams) -> None:
        self.params = params
        self.n = params.n
        offsets, at = [], 0
        for p in params.params:
            offsets.append(at)
            at += p.numel()
        self.offsets = offsets
        self.reads = 0  # chunks computed (tests)

    @torch.no_grad()
    def read(self, lo: int, hi: int) -> Any:
        if not 0 <= lo <= hi <= self.n:
            raise ValueError(f"chunk [{lo}, {hi}) of {self.n} values")
        self.reads += 1
        out = torch.empty(hi - lo, dtype=torch.float32, device=self.params.device)
        for p, start in zip(self.params.params, self.offsets, strict=True):
            a, b = max(lo, start), min(hi, start + p.numel())
            if a >= b:
                continue
            flat = p.detach().reshape(-1)[a - start:b - start].float()
            torch.sub(self.params.theta[a:b], flat, out=out[a - lo:b - lo])
        return out.cpu().numpy() if out.device.type != "cpu" else out.numpy()

    def whole(self) -> Any:
        return self.params.delta()

    def release(self) -> None:
        self.params.release()


def spool_dir(state_dir: Path) -> Path:
    return state_dir / "spool"


def new_spool(state_dir: Path) -> FileSpool:
    """A fresh spool file for the update being encoded (the older ones go)."""
    d = spool_dir(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    clear(state_dir)
    fd, path = tempfile.mkstemp(prefix="update-", suffix=SUFFIX, dir=d)
    os.close(fd)
    return FileSpool(path)


def clear(state_dir: Path) -> None:
    """Remove every spool file (no update is pending; a transfer still reading one goes on
    through its open descriptor)."""
    d = spool_dir(state_dir)
    if not d.is_dir():
        return
    for f in d.glob("*" + SUFFIX):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()

