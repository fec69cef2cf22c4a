"""A native node's pseudo-gradient a chunk at a time, and its spool files (chunked encoding:
shared.chunk_encode, shared.chunk_submit).

`ParamsDelta` is the `DeltaSource` of a trained round: Δ[lo:hi] = θ_r[lo:hi] − θ_H[lo:hi]
computed from the round's base params (`DeviceParams.theta`: the participant's own array on
CPU, a device buffer on CUDA) and the model's parameters, tensor by tensor, on the model's
device; only the chunk comes to the host. The same float32 subtraction as
`DeviceParams.delta`, so the same bits. The base stays held until `release` (after the
participant has encoded the update).

`RssPeak` samples the process's resident set while an update is encoded (either path), for
the log line bench.node_stream reads.

Spool files live in `<state dir>/spool/`, one per pending update: a new one removes the
others (older updates, never resubmitted again), a cleared journal removes them all.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path
from types import TracebackType
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



def rss_mb() -> float | None:
    """This process's resident set now (MB; None where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class RssPeak:
    """The largest resident set seen while the block runs (a thread samples every 2 ms)."""

    def __init__(self) -> None:
        self.before = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            now = rss_mb()
            if now is not None and (self.peak is None or now > self.peak):
                self.peak = now

    def __enter__(self) -> RssPeak:
        if self.before is not None:
            self._thread.start()
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample_once()

    def _sample_once(self) -> None:
        now = rss_mb()
        if now is not None and (self.peak is None or now > self.peak):
            self.peak = now

    def line(self) -> str:
        if self.before is None or self.peak is None:
            return "RSS not measured"
        return f"RSS {self.before:.1f} MB before, peak {self.peak:.1f} MB while encoding"
