"""Several processes, one node: the round's inner steps with torch.distributed (DDP or FSDP).

    python -m native_node join --nproc N   (gloo, CPU processes; tested)
    python -m native_node join --gpus N    (NCCL, one process per GPU; run on one H100 as
                                            one process only, see docs/benchmarks.md)
    ... [--shard auto|none|full]           (DDP or FSDP: below)

The participant (shared/participant.py, driven by native_node/client.py) is unchanged and runs
in the node's process: it sees one trainer with `Trainer.train_round`'s signature and result,
so the box makes ONE outer sync per round (one Submit), not N. Only the inner loop is spread:

- `DistributedTrainer` starts N worker processes (`python -m native_node.distributed_trainer`,
  each wrapped by `transport.lifetime.orphan_safe`, so they get SIGKILL when the node dies)
  from the thread that constructs it (the node's event-loop thread: long-lived, as
  transport/lifetime.py requires). Each talks to the node over its own socketpair
  (multiprocessing.connection framing, pickled tuples).
- The workers form a process group (rendezvous on a free 127.0.0.1 port) and wrap the model
  in DDP: gradients are averaged every step, so the replicas stay identical. Every rank draws
  the SAME global batch as a one-process `Trainer` with the same node id would (one sampler
  over the whole shard, the round's batch_size, the node's seed) and trains on its slice of
  it (`rank_rows`: batch_size // N rows, the remainder to the first ranks); each rank's loss is
  weighted by its share of the batch, so DDP's average is the global batch's mean loss and
  the steps are the one-process steps up to float rounding (bench.multigpu measures the gap).
  Each rank keeps its own copy of the inner AdamW state (identical across ranks).
- On CUDA (`--gpus N`, one device per rank) the worker uses what `Trainer` uses there: bf16
  autocast, torch's fused AdamW, θ_r on the device and Δ through pinned host memory.
- Per round the node sends θ to rank 0, which broadcasts it; after the H steps rank 0 sends
  back Δ = θ − θ_H and the mean loss over all ranks. A cancel (a newer RoundOpen) is sent to
  every rank and agreed on with an all-reduce before each step, so no rank is left waiting in
  a collective.

FSDP (`--shard full`, or `auto` on CUDA when the model's parameters + gradients + AdamW state
would not fit one device's free memory; never automatic on CPU): the workers wrap the model
with FSDP2 `torch.distributed.fsdp.fully_shard` (each transformer block a unit, then the
root) over a device mesh of the N ranks (tested on CPU with gloo; NCCL at one rank on an H100).
Each rank holds 1/N of every parameter (dim-0 rows, torch.chunk's split), of its gradient and
of the inner AdamW moments; a unit's full parameters exist only while its forward/backward
runs (all-gathered, freed after). The batch split, loss weighting, clipping (the global norm
over the shards) and cancel agreement are DDP's, so the steps are again the one-process steps
up to rounding. θ and Δ never exist in full on a rank: each rank tells the node which ranges
of the flat parameter vector it holds (`ShardLayout`), the node sends each rank its ranges of
θ_r and puts Δ together from the ranks' pieces when the round ends, in its own host memory,
where the participant encodes the one update (the outer sync is unchanged).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from native_node.sharding import (
    SHARD_MODES,
    ShardParams,
    fsdp_units,
    needs_sharding,
    shard_ranges,
    state_bytes,
    transient_bytes,
)
from native_node.trainer import RoundResult
from transport.lifetime import die_with_parent, orphan_safe

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)
START_TIMEOUT_S = 300.0  # workers import torch, rebuild the workload, join the group


def rank_batch(batch_size: int, rank: int, world: int) -> int:
    """Rows per step for `rank`: the node's batch split over `world` ranks."""
    return batch_size // world + (1 if rank < batch_size % world else 0)


def rank_rows(batch_size: int, rank: int, world: int) -> slice:
    """`rank`'s contiguous rows of the node's global batch (the slices tile the batch)."""
    start = sum(rank_batch(batch_size, r, world) for r in range(rank))
    return slice(start, start + rank_batch(batch_size, rank, world))


def check_gpus(n: int) -> None:
    """`--gpus n` needs n CUDA devices; raises ValueError with what is missing."""
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"--gpus {n}: CUDA is not available on this machine "
                         "(use --nproc N for several CPU processes)")
    have = torch.cuda.device_count()
    if have < n:
        raise ValueError(f"--gpus {n}: this machine has {have} CUDA device(s)")


class DistributedTrainer:
    """`Trainer`'s interface over `nproc` worker processes (DDP or FSDP over gloo or NCCL).

    `sharding`: "none" (DDP), "full" (FSDP) or "auto" (FSDP on CUDA when the model's training
    state would not fit one device, see `needs_sharding`); `self.sharded` says which ran once
    the workers are ready, `self.memory` each rank's state bytes after the last round."""

    def __init__(self, recipe: dict[str, Any], *, shard: int, n_shards: int, node_id: str,
                 nproc: int, device: str = "cpu", threads: int = 0,
                 sharding: str = "none") -> None:
        if nproc < 1:
            raise ValueError("nproc must be >= 1")
        if sharding not in SHARD_MODES:
            raise ValueError(f"sharding must be one of {SHARD_MODES}, not {sharding!r}")
        self.nproc = nproc
        self.sharded: bool | None = None  # decided by the workers (auto), known when ready
        self.layout: list[list[tuple[int, int]]] = []  # per rank: (offset, length) of θ held
        self.n_params = 0
        self.memory: list[dict[str, int]] = []
        self.backend = "nccl" if device.startswith("cuda") else "gloo"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        seed = int.from_bytes(hashlib.sha256(node_id.encode()).digest()[:4], "little")
        per_rank_threads = max(1, threads // nproc) if threads > 0 else 0
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
        self.procs: list[subprocess.Popen[bytes]] = []
        self.conns: list[Connection] = []
        try:
            for rank in range(nproc):
                mine, theirs = socket.socketpair()
                fd = theirs.fileno()
                proc = subprocess.Popen(
                    orphan_safe([sys.executable, "-m", "native_node.distributed_trainer",
                                 str(fd), str(os.getpid())]),
                    pass_fds=(fd,), env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
                theirs.close()
                self.procs.append(proc)
                conn = Connection(mine.detach())
                self.conns.append(conn)
                wdev = f"cuda:{rank}" if self.backend == "nccl" else device
                conn.send(("init", {
                    "recipe": recipe, "shard": shard, "n_shards": n_shards, "seed": seed,
                    "rank": rank, "world": nproc, "port": port, "backend": self.backend,
                    "device": wdev, "threads": per_rank_threads, "sharding": sharding}))
        except BaseException:
            self.close()
            raise
        self._ready = False
        self._seq = 0

    def _recv(self, rank: int, timeout: float | None = None) -> Any:
        conn = self.conns[rank]
        if timeout is not None and not conn.poll(timeout):
            raise TimeoutError(f"distributed trainer: rank {rank} did not answer")
        try:
            msg = conn.recv()
        except (EOFError, OSError) as exc:
            raise RuntimeError(f"distributed trainer: rank {rank} died "
                               f"(exit {self.procs[rank].poll()})") from exc
        if msg[0] == "error":
            raise RuntimeError(f"distributed trainer: rank {rank} failed: {msg[1]}")
        return msg

    def wait_ready(self) -> None:
        if not self._ready:
            for rank in range(self.nproc):
                _, _, sharded, n_params, ranges = self._recv(rank, START_TIMEOUT_S)
                self.sharded, self.n_params = bool(sharded), int(n_params)
                self.layout.append(ranges)
            if self.sharded:  # the ranks' pieces must tile the flat vector exactly
                pieces = sorted(r for ranges in self.layout for r in ranges if r[1] > 0)
                ends = [0] + [o + n for o, n in pieces]
                if [o for o, _ in pieces] != ends[:-1] or ends[-1] != self.n_params:
                    raise RuntimeError("distributed trainer: FSDP shards do not tile θ")
            log.info("inner steps over %d processes: %s", self.nproc,
                     "FSDP (parameters, gradients, AdamW state sharded)" if self.sharded
                     else "DDP (a replica each)")
            self._ready = True

    def _theta_for(self, rank: int, theta: np.ndarray) -> np.ndarray | None:
        """What rank `rank` gets of θ_r: all of it (DDP, rank 0 broadcasts) or its shard."""
        if not self.sharded:
            return theta if rank == 0 else None
        return np.concatenate([theta[o:o + n] for o, n in self.layout[rank]])

    def train_round(self, theta: np.ndarray, *, steps: int, lr: float, batch_size: int,
                    cancel: threading.Event | None = None,
                    progress: Callable[[int, float], None] | None = None) -> RoundResult:
        self.wait_ready()
        theta = np.ascontiguousarray(theta, dtype=np.float32)
        self._seq += 1
        seq = self._seq
        for rank, conn in enumerate(self.conns):
            conn.send(("round", seq, self._theta_for(rank, theta), steps, lr, batch_size))
        cancelled = False
        done_msg: Any = None
        while done_msg is None:
            if cancel is not None and cancel.is_set() and not cancelled:
                cancelled = True
                for conn in self.conns:
                    conn.send(("cancel", seq))
            if not self.conns[0].poll(0.05):
                if self.procs[0].poll() is not None:
                    raise RuntimeError("distributed trainer: rank 0 died")
                continue
            msg = self._recv(0)
            if msg[0] == "progress" and progress is not None:
                progress(msg[1], msg[2])
            elif msg[0] == "done":
                done_msg = msg
        _, delta, mean, done, compute, memory = done_msg
        pieces, self.memory = {0: delta}, [memory]
        for rank in range(1, self.nproc):
            while (msg := self._recv(rank))[0] != "done":
                pass
            pieces[rank] = msg[1]
            self.memory.append(msg[2])
        if self.sharded:  # Δ in full, once, here: the node's host memory (the outer sync)
            delta = np.empty(self.n_params, dtype=np.float32)
            for rank, ranges in enumerate(self.layout):
                at = 0
                for o, n in ranges:
                    delta[o:o + n] = pieces[rank][at:at + n]
                    at += n
        return RoundResult(delta=delta, train_loss=mean, samples=done * batch_size,
                           compute_s=compute, steps=done)

    def close(self) -> None:
        for conn in self.conns:
            with suppress(OSError):
                conn.send(("stop",))
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []


# -- the worker process --------------------------------------------------------------------
def _wrap(model: Any, sharding: str, device: Any, rank: int,
          world: int) -> tuple[Any, Any, bool, list[tuple[int, int]], int]:
    """DDP or FSDP around `model` (built on the host): (the module to call, its θ/Δ keeper,
    sharded, this rank's ranges of θ, `transient_bytes`)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from native_node.trainer import DeviceParams

    sharded = sharding == "full"
    if sharding == "auto":  # every rank decides, then all agree (free memory may differ)
        if device.type == "cuda":
            n_params = sum(p.numel() for p in model.parameters())
            sharded = needs_sharding(n_params, torch.cuda.mem_get_info(device)[0])
        vote = torch.tensor([1.0 if sharded else 0.0], device=device)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        sharded = bool(vote.item() > 0)
    if not sharded:
        model = model.to(device)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None)
        return ddp, DeviceParams(model, device), False, [], transient_bytes(model, False)
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 has FSDP2 under its old name
        from torch.distributed._composable.fsdp import (  # type: ignore[attr-defined,no-redef,unused-ignore]
            fully_shard,
        )

    transient = transient_bytes(model, True)
    ranges = shard_ranges([tuple(p.shape) for p in model.parameters()], rank, world)
    mesh = init_device_mesh(device.type, (world,))
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: what the units leave (embeddings, head)
    return model, ShardParams(model, ranges, device), True, ranges, transient


def _worker(conn: Connection) -> None:
    import torch
    import torch.distributed as dist

    from ml.data import BatchSampler, DataSpec, shard_indices
    from ml.inner_opt import InnerOpt, make_inner_opt
    from ml.workload import from_spec
    from ml.zoo import loss_for
    from native_node.trainer import autocast

    _, cfg = conn.recv()
    rank, world = int(cfg["rank"]), int(cfg["world"])
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    recipe = cfg["recipe"]
    work = from_spec(recipe["model"], DataSpec.from_dict(recipe["data"]),
                     local_path=recipe.get("local_path"),
                     cache_dir=Path(recipe["cache_dir"]) if recipe.get("cache_dir") else None)
    dist.init_process_group(cfg["backend"], init_method=f"tcp://127.0.0.1:{cfg['port']}",
                            rank=rank, world_size=world)
    model = work.new_model()  # on the host: FSDP moves only this rank's shards to the device
    net, params, sharded, ranges, transient = _wrap(model, cfg["sharding"], device, rank, world)
    n_params = sum(int(np.prod(p.shape)) for p in model.parameters())
    ds, spec = work.dataset, work.data_spec
    shard = shard_indices(ds.keys_train, n_shards=cfg["n_shards"], shard=cfg["shard"],
                          partition=spec.partition, alpha=spec.alpha, seed=spec.seed)
    sampler: BatchSampler | None = None
    opt: InnerOpt | None = None
    conn.send(("ready", rank, sharded, n_params, ranges))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        if msg[0] != "round":
            continue  # a cancel that came after its round ended
        _, seq, theta, steps, lr, batch_size = msg
        if sharded or rank == 0:  # FSDP: each rank's shard comes from the node
            params.set_theta(theta)
        if not sharded:  # rank 0 sends the node's array; the others receive into their own
            dist.broadcast(params.theta if rank == 0 else params.own(), 0)
        params.to_model()
        if opt is None:
            opt = make_inner_opt(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                 weight_decay=0.01, device=device)
        opt.lr = lr
        if sampler is None or sampler.batch_size != batch_size:
            sampler = BatchSampler(ds.x_train, ds.y_train, shard, batch_size=batch_size,
                                   seed=cfg["seed"])
        rows = rank_rows(batch_size, rank, world)
        # this rank's share of the global mean; a rank with no rows this step runs one row at
        # weight 0, since DDP/FSDP need every rank in every collective
        share = (rows.stop - rows.start) / batch_size
        if share == 0:
            rows = slice(0, 1)
        net.train()
        losses: list[float] = []
        compute, done = 0.0, 0
        flag = torch.zeros(1, device=device)
        stop = False
        for _step in range(steps):
            if conn.poll(0):
                got = conn.recv()
                stop = stop or (got[0] == "cancel" and got[1] == seq)
            flag.fill_(1.0 if stop else 0.0)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                break
            xb, yb = sampler.sample()  # the global batch: every rank draws the same rows
            t0 = time.perf_counter()
            x = torch.from_numpy(np.ascontiguousarray(xb[rows])).to(device)
            y = torch.from_numpy(np.ascontiguousarray(yb[rows])).to(device)
            with autocast(device):
                loss = loss_for(model)(net(x), y) * share
            opt.zero_grad()
            # DDP averages over the ranks (FSDP's reduce-scatter too): the global mean's grads
            (loss * world).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # FSDP: the global norm
            opt.step()
            value = loss.detach().float().reshape(1)
            dist.all_reduce(value, op=dist.ReduceOp.SUM)  # the global batch's mean loss
            mean_loss = float(value)
            compute += time.perf_counter() - t0
            losses.append(mean_loss)
            done += 1
            if rank == 0:
                conn.send(("progress", done, mean_loss))
        memory = state_bytes(model, opt, transient, device)
        _finish(conn, rank, params.delta() if rank == 0 or sharded else None, losses, done,
                compute, memory)  # FSDP: every rank sends its piece of Δ
    dist.destroy_process_group()


def _finish(conn: Connection, rank: int, piece: np.ndarray | None, losses: list[float],
            done: int, compute: float, memory: dict[str, int]) -> None:
    """A rank's end of round: rank 0 sends Δ (or its piece), the mean loss and the counts."""
    if rank == 0:
        mean = float(np.mean(losses)) if losses else None
        conn.send(("done", piece, mean if mean is None or np.isfinite(mean) else None,
                   done, compute, memory))
    else:
        conn.send(("done", piece, memory))


def main(argv: list[str]) -> int:
    fd, parent = int(argv[0]), int(argv[1])
    die_with_parent(parent)
    conn = Connection(fd)
    try:
        _worker(conn)
    except (EOFError, KeyboardInterrupt):
        return 0  # the node went away
    except Exception as exc:
        import traceback

        traceback.print_exc()
        with suppress(OSError):
            conn.send(("error", f"{exc.__class__.__name__}: {exc}"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
