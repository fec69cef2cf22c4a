"""Several processes, one node: the round's inner steps with torch.distributed (DDP).

    python -m native_node join --nproc N   (gloo, CPU processes; tested)
    python -m native_node join --gpus N    (NCCL, one process per GPU; never run: no GPU here)

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
"""

from __future__ import annotations

import hashlib
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

from native_node.trainer import RoundResult
from transport.lifetime import die_with_parent, orphan_safe

ROOT = Path(__file__).resolve().parent.parent
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
    """`Trainer`'s interface over `nproc` worker processes (DDP over gloo or NCCL)."""

    def __init__(self, recipe: dict[str, Any], *, shard: int, n_shards: int, node_id: str,
                 nproc: int, device: str = "cpu", threads: int = 0) -> None:
        if nproc < 1:
            raise ValueError("nproc must be >= 1")
        self.nproc = nproc
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
                    "device": wdev, "threads": per_rank_threads}))
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
                self._recv(rank, START_TIMEOUT_S)
            self._ready = True

    def train_round(self, theta: np.ndarray, *, steps: int, lr: float, batch_size: int,
                    cancel: threading.Event | None = None,
                    progress: Callable[[int, float], None] | None = None) -> RoundResult:
        self.wait_ready()
        theta = np.ascontiguousarray(theta, dtype=np.float32)
        self._seq += 1
        seq = self._seq
        for rank, conn in enumerate(self.conns):
            conn.send(("round", seq, theta if rank == 0 else None, steps, lr, batch_size))
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
        for rank in range(1, self.nproc):
            while self._recv(rank)[0] != "done":
                pass
        _, delta, mean, done, compute = done_msg
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
def _worker(conn: Connection) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ml.data import BatchSampler, DataSpec, shard_indices
    from ml.inner_opt import InnerOpt, make_inner_opt
    from ml.workload import from_spec
    from ml.zoo import loss_fn
    from native_node.trainer import DeviceParams, autocast

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
    model = work.new_model().to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                  else None)
    ds, spec = work.dataset, work.data_spec
    shard = shard_indices(ds.keys_train, n_shards=cfg["n_shards"], shard=cfg["shard"],
                          partition=spec.partition, alpha=spec.alpha, seed=spec.seed)
    sampler: BatchSampler | None = None
    opt: InnerOpt | None = None
    params = DeviceParams(model, device)
    conn.send(("ready", rank))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        if msg[0] != "round":
            continue  # a cancel that came after its round ended
        _, seq, theta, steps, lr, batch_size = msg
        if rank == 0:
            params.set_theta(theta)
        dist.broadcast(params.theta, 0)
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
        # weight 0, since DDP needs every rank in every gradient all-reduce
        share = (rows.stop - rows.start) / batch_size
        if share == 0:
            rows = slice(0, 1)
        ddp.train()
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
                loss = loss_fn(ddp(x), y) * share
            opt.zero_grad()
            (loss * world).backward()  # DDP averages over the ranks: the global mean's grads
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            value = loss.detach().float().reshape(1)
            dist.all_reduce(value, op=dist.ReduceOp.SUM)  # the global batch's mean loss
            mean_loss = float(value)
            compute += time.perf_counter() - t0
            losses.append(mean_loss)
            done += 1
            if rank == 0:
                conn.send(("progress", done, mean_loss))
        if rank == 0:
            delta = params.delta()
            mean = float(np.mean(losses)) if losses else None
            conn.send(("done", delta, mean if mean is None or np.isfinite(mean) else None,
                       done, compute))
        else:
            conn.send(("done",))
    dist.destroy_process_group()


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
