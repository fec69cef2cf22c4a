"""PyTorch DDP baseline for bench.vs_ddp: one worker process, and the launcher of N of them.

    python -m bench.ddp_worker --rank R --world N --port P --out DIR [workload flags]

A worker trains the run's zoo model on its shard (the same `shard_indices` the nodes use)
with the node trainer's inner step (AdamW betas (0.9, 0.95), weight decay 0.01, grad-norm
clip 1.0, the run's lr and per-worker batch) under `DistributedDataParallel` (gloo,
127.0.0.1), with either a plain all-reduce hook (the reference hook DDP documents as
identical to its built-in all-reduce) or the PowerSGD hook. Every all-reduce the hooks issue
is counted (calls, tensor bytes), and the hook's time (compression + all-reduce wait) is
taken out of the step time, so `compute` is forward/backward/clip/optimizer only, as in
`native_node.trainer`. Rank 0 keeps a flat copy of the params every `--eval-every` steps; the
launcher evaluates them after the run with `ml.zoo.evaluate` on the run's
validation split.

Transport bytes: `run_ddp` reads the `lo` counters of /proc/net/dev (per network namespace)
before the workers start and after they exit; bench.vs_ddp runs inside a private namespace
(`unshare -n`), so nothing else shares that interface.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, free_port


def lo_counters() -> tuple[int, int]:
    """(tx_bytes, tx_packets) of the loopback interface in this network namespace."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            f = rest.split()
            return int(f[8]), int(f[9])
    raise RuntimeError("no lo interface in /proc/net/dev")


def load_workload(model: str, flavour: str | None, seed: int) -> Any:
    """The workload the server resolves for `--model M --flavour F --seed S` (iid)."""
    from ml.workload import resolve

    return resolve(model=model, flavour=flavour, data=None, data_path=None, partition="iid",
                   alpha=0.5, seed=seed)


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel

    from ml.data import BatchSampler, shard_indices
    from ml.zoo import flatten, loss_fn

    torch.set_num_threads(1)
    calls = {"n": 0, "bytes": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor: Any, *a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        calls["bytes"] += tensor.numel() * tensor.element_size()
        return real_all_reduce(tensor, *a, **kw)

    setattr(dist, "all_reduce", counting_all_reduce)  # noqa: B010 - the hooks look it up

    work = load_workload(args.model, args.flavour, args.seed)
    ds, spec = work.dataset, work.data_spec
    idx = shard_indices(ds.keys_train, n_shards=args.world, shard=args.rank,
                        partition=spec.partition, alpha=spec.alpha, seed=spec.seed)
    sampler = BatchSampler(ds.x_train, ds.y_train, idx, batch_size=args.batch_size,
                           seed=args.rank)
    dist.init_process_group("gloo", rank=args.rank, world_size=args.world,
                            init_method=f"tcp://127.0.0.1:{args.port}",
                            timeout=datetime.timedelta(seconds=300))
    model = work.new_model()
    ddp = DistributedDataParallel(model)
    hook_s = [0.0]

    def timed(inner: Any, state: Any) -> Any:
        def hook(st: Any, bucket: Any) -> Any:
            t0 = time.perf_counter()

            def done(fut: Any) -> Any:
                hook_s[0] += time.perf_counter() - t0
                return fut.value()

            return inner(st, bucket).then(done)

        # DDP compares a hook's annotations with dist.GradBucket literally, and
        # `from __future__ import annotations` makes them strings: show it none
        hook.__annotations__.clear()
        return hook

    if args.hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=args.rank_psgd,
            start_powerSGD_iter=args.psgd_start, use_error_feedback=True, warm_start=True)
        ddp.register_comm_hook(state, timed(powerSGD_hook.powerSGD_hook, state))
    else:
        ddp.register_comm_hook(None, timed(default_hooks.allreduce_hook, None))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.01)
    dist.barrier()
    calls["n"] = calls["bytes"] = 0
    snaps: list[np.ndarray] = [flatten(model)] if args.rank == 0 else []
    compute, comm, losses, ar_calls, ar_bytes = [], [], [], [], []
    t_start = time.time()
    for step in range(args.steps):
        xb, yb = sampler.sample()
        hook_s[0] = 0.0
        calls0, bytes0 = calls["n"], calls["bytes"]
        t0 = time.perf_counter()
        x = torch.from_numpy(np.ascontiguousarray(xb))
        y = torch.from_numpy(np.ascontiguousarray(yb))
        loss = loss_fn(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        total = time.perf_counter() - t0
        compute.append(total - hook_s[0])
        comm.append(hook_s[0])
        ar_calls.append(calls["n"] - calls0)
        ar_bytes.append(calls["bytes"] - bytes0)
        if args.rank == 0 and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            snaps.append(flatten(model))
    t_end = time.time()
    dist.barrier()
    out = Path(args.out)
    if args.rank == 0:
        np.save(out / "snapshots.npy", np.stack(snaps))
    (out / f"rank{args.rank}.json").write_text(json.dumps({
        "rank": args.rank, "compute_s": compute, "comm_s": comm, "t_start": t_start,
        "t_end": t_end, "all_reduce_calls": ar_calls, "all_reduce_bytes": ar_bytes,
        "train_loss_last100": float(np.mean(losses[-100:]))}))
    dist.barrier()  # every rank has written its results before any tears down
    dist.destroy_process_group()


def run_ddp(tmp: Path, *, model: str, flavour: str | None, seed: int, workers: int,
            steps: int, batch_size: int, lr: float, hook: str, eval_every: int,
            psgd_rank: int = 4, psgd_start: int = 10, timeout: float = 1800.0) -> dict[str, Any]:
    """Launch `workers` DDP processes and collect their figures (see the module doc)."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    flags = ["--world", str(workers), "--port", str(port), "--out", str(tmp), "--model", model,
             "--seed", str(seed), "--steps", str(steps), "--batch-size", str(batch_size),
             "--lr", str(lr), "--hook", hook, "--eval-every", str(eval_every),
             "--rank-psgd", str(psgd_rank), "--psgd-start", str(psgd_start)]
    if flavour:
        flags += ["--flavour", flavour]
    tx0, pk0 = lo_counters()
    t0 = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for r in range(workers):
            log = open(tmp / f"rank{r}.log", "wb")  # noqa: SIM115 - closed with the child
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.ddp_worker", "--rank", str(r), *flags],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        for p in procs:
            rc = p.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
            if rc != 0:
                r = procs.index(p)
                tail = (tmp / f"rank{r}.log").read_text(errors="replace")[-3000:]
                if not (tmp / f"rank{r}.json").exists():
                    raise RuntimeError(f"DDP worker exited {rc}:\n{tail}")
                # its figures were written after the last step and a barrier: a crash in
                # gloo's teardown (pytorch/pytorch#190489) does not touch them
                print(f"DDP worker {r} exited {rc} after writing its results; kept them. "
                      f"Its log ends:\n{tail[-500:]}", file=sys.stderr)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
    wall_total = time.monotonic() - t0
    tx1, pk1 = lo_counters()
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(workers)]
    snaps = np.load(tmp / "snapshots.npy")
    return {"ranks": ranks, "snapshots": snaps, "lo_tx_bytes": tx1 - tx0,
            "lo_tx_packets": pk1 - pk0, "wall_total_s": wall_total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ddp_worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="gpt-tiny")
    p.add_argument("--flavour", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--hook", choices=("allreduce", "powersgd"), default="allreduce")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--rank-psgd", type=int, default=4)
    p.add_argument("--psgd-start", type=int, default=10)
    _worker(p.parse_args(argv))
    # gloo's threads can still hold Python objects (the comm hooks' futures) when the
    # interpreter finalizes, and tearing them down then aborts the process ("terminate
    # called without an active exception", 1 CI run in ~20): the results are on disk and the
    # process group is destroyed, so leave without finalizing
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
