"""One node over several processes (torch.distributed DDP or FSDP) against one node, one process.

    python -m bench.multigpu [--model mlp-digits|gpt-tiny] [--nproc 2] [--rounds 4]
                             [--shard none|full]

Both runs: the REAL server (subprocess, loopback) and ONE real native node, same model, seed,
shard, inner steps, inner lr and batch size. The two nodes use the same identity (the multi
run starts from a copy of the single run's node.key), so their data seed (derived from the
node id) is the same: with `--nproc N` every process draws the same global batch the one
process draws, trains on its slice of it and DDP averages the gradients weighted by the
slices, so both runs see the same rows in the same order (same global batch and tokens) and
the gap is the split's float rounding, not different data. With one node the outer step is
plain averaging by default (outer lr 1, no momentum: the node's θ carries over, so both
runs are rounds x steps AdamW steps on the same data and the gap measures the split alone;
`--nesterov` keeps the run's default). On CPU the backend is gloo; NCCL (`--gpus N`) needs several
GPUs and has not run (docs/benchmarks.md has a one-process check on an H100).

`--shard full` runs the multi-process node with FSDP (`--shard full`: parameters, gradients and
inner AdamW state sharded over the processes) and then, in this process, one round each of
DDP and FSDP over the same processes (`DistributedTrainer`) to report each rank's training
state: parameters + gradients + AdamW moments counted from the tensors the rank holds
(`state_bytes_per_rank`), and that plus what a step holds on top (`peak_bytes_per_rank`:
DDP's gradient buckets; FSDP's gathered units, modelled from the parameter counts, see
native_node/sharding.py transient_bytes; on CUDA the allocator's measured peak as well).

Counted at the server: the updates per round from the node (`outer_syncs_per_round`, from the
run's sqlite: one row per accepted update) and the server's per-peer WebSocket bytes. The LAST
stdout line is JSON (bench.common.emit).
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import children, emit, free_port, get_json, print_table


def run_one(tmp: Path, *, model: str, flavour: str | None, nproc: int, rounds: int,
            steps: int, batch: int, lr: float, timeout: float,
            outer: list[str], node_key: Path | None = None, shard: str = "none"
            ) -> dict[str, Any]:
    """One run; `node_key` (a node.key file) gives the node that identity, hence its seed."""
    tmp.mkdir(parents=True, exist_ok=True)
    if node_key is not None:
        (tmp / "node").mkdir(parents=True, exist_ok=True)
        shutil.copy2(node_key, tmp / "node" / "node.key")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    flags = ["--model", model, "--seed", "0", "--n-shards", "1", "--inner-steps", str(steps),
             "--inner-lr", str(lr), "--batch-size", str(batch), "--deadline-s", "600",
             "--codec", "raw32", "--rounds", str(rounds), "--quorum", "1", *outer]
    if flavour:
        flags += ["--flavour", flavour]
    t0 = time.monotonic()
    with children(tmp) as spawn:
        server = spawn("server", "-m", "server", "--data-dir", str(tmp / "run"), "--port",
                       str(port), *flags)
        while True:
            try:
                get_json(base + "/api/run")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() - t0 > 120:
                    raise RuntimeError(f"server did not start; see {tmp}/server.log") from None
                time.sleep(0.2)
        node = spawn("node", "-m", "native_node", "join", "--coordinator",
                     f"127.0.0.1:{port}", "--state-dir", str(tmp / "node"), "--threads",
                     str(nproc), "--nproc", str(nproc), "--quiet",
                     *(["--shard", shard] if nproc > 1 else []))
        while node.poll() is None:
            if server.poll() is not None or time.monotonic() - t0 > timeout:
                raise RuntimeError(f"run failed or timed out; logs in {tmp}")
            time.sleep(0.3)
        run = get_json(base + "/api/run")
        if run["status"] != "finished":
            raise RuntimeError(f"the node left before the run finished; logs in {tmp}")
        peers = [p for p in get_json(base + "/api/peers") if p["role"] == "trainer"]
        rows = get_json(base + f"/api/rounds?limit={rounds + 10}")
    db = sqlite3.connect(tmp / "run" / "run.sqlite")
    per_round = [n for (n,) in db.execute(
        "SELECT COUNT(*) FROM updates GROUP BY round ORDER BY round")]
    db.close()
    server_bytes = sum(p["bytes_up"] + p["bytes_down"] for p in peers)
    return {"procs": nproc, "rounds": len(rows), "final_eval_loss": rows[-1]["eval_loss"],
            "curve": [round(r["eval_loss"], 4) for r in rows],
            "updates_per_round": max(per_round) if per_round else 0,
            "server_bytes_per_round": server_bytes / max(1, len(rows)),
            "wall_s": time.monotonic() - t0}


def memory_probe(*, model: str, flavour: str | None, nproc: int, steps: int, batch: int,
                 lr: float) -> dict[str, list[dict[str, int]]]:
    """One round of DDP and one of FSDP over `nproc` processes: each rank's state bytes."""
    from ml.workload import initial_params, resolve
    from native_node.distributed_trainer import DistributedTrainer

    work = resolve(model=model, flavour=flavour, data=None, data_path=None, partition="iid",
                   alpha=0.5, seed=0)
    theta = initial_params(work)
    out: dict[str, list[dict[str, int]]] = {}
    for mode in ("none", "full"):
        trainer = DistributedTrainer({"model": work.model_config,
                                      "data": work.data_spec.to_dict()},
                                     shard=0, n_shards=1, node_id="probe", nproc=nproc,
                                     threads=nproc, sharding=mode)
        try:
            trainer.train_round(theta, steps=steps, lr=lr, batch_size=batch)
        finally:
            trainer.close()
        out["fsdp" if mode == "full" else "ddp"] = trainer.memory
    return out


def sig(x: float) -> float:
    """Three significant digits (a gap of float rounding stays visible, e.g. 1.05e-07)."""
    return float(f"{x:.3g}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.multigpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp-digits", choices=("mlp-digits", "gpt-tiny"))
    p.add_argument("--flavour", default=None, help="model flavour (gpt-tiny: nano)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--shard", default="none", choices=("none", "full"),
                   help="the multi-process node's --shard: none (DDP) or full (FSDP)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="inner steps per round")
    p.add_argument("--batch-size", type=int, default=32, help="the node's batch per step")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--nesterov", action="store_true",
                   help="the run's default outer step (Nesterov) instead of plain averaging")
    args = p.parse_args(argv)
    flavour = args.flavour or ("nano" if args.model == "gpt-tiny" else None)
    common = {"model": args.model, "flavour": flavour, "rounds": args.rounds,
              "steps": args.steps, "batch": args.batch_size, "lr": args.lr,
              "timeout": args.timeout,
              "outer": [] if args.nesterov else ["--outer-lr", "1.0", "--outer-momentum", "0.0"]}
    with tempfile.TemporaryDirectory(prefix="daa-multigpu-") as d:
        single = run_one(Path(d) / "single", nproc=1, **common)
        multi = run_one(Path(d) / "multi", nproc=args.nproc, shard=args.shard,
                        node_key=Path(d) / "single" / "node" / "node.key", **common)
    mode = "FSDP" if args.shard == "full" else "DDP"
    print(f"{args.model}{' ' + flavour if flavour else ''}: {args.rounds} rounds x {args.steps} "
          f"inner steps, batch {args.batch_size} per node step (split over the {args.nproc} "
          f"processes, {mode}), raw32")
    print_table([single, multi], ["procs", "rounds", "updates_per_round", "final_eval_loss",
                                  "server_bytes_per_round", "wall_s"])
    for r in (single, multi):
        print(f"eval loss per round, {r['procs']} process(es): {r['curve']}")
    # eval loss moves +-20% from round to round here: compare the mean of the last 3 rounds
    tail = {k: sum(r["curve"][-3:]) / len(r["curve"][-3:]) for k, r in (("s", single),
                                                                          ("m", multi))}
    gap = abs(tail["m"] - tail["s"]) / tail["s"]
    round_gap = max(abs(m - s) / s for s, m in zip(single["curve"], multi["curve"],
                                                     strict=False))
    final_gap = abs(multi["final_eval_loss"] - single["final_eval_loss"]) / single[
        "final_eval_loss"]
    extra: dict[str, Any] = {}
    if args.shard == "full":
        mem = memory_probe(model=args.model, flavour=flavour, nproc=args.nproc,
                           steps=2, batch=args.batch_size, lr=args.lr)
        print_table([{"mode": k, "rank": r, **m} for k, ms in mem.items()
                     for r, m in enumerate(ms)],
                    ["mode", "rank", "params", "grads", "adamw", "state", "transient", "peak"])
        top = {k: {f: max(m[f] for m in ms) for f in ("state", "peak")} for k, ms in mem.items()}
        extra = {"shard": "full",
                 "state_bytes_per_rank": {k: v["state"] for k, v in top.items()},
                 "state_vs_ddp": round(top["fsdp"]["state"] / top["ddp"]["state"], 4),
                 "peak_bytes_per_rank": {k: v["peak"] for k, v in top.items()},
                 "peak_vs_ddp": round(top["fsdp"]["peak"] / top["ddp"]["peak"], 4),
                 "peak_counted": "state from the ranks' tensors; transient modelled (CPU)"}
    emit({"bench": "multigpu", "model": args.model, "procs": args.nproc, "backend": "gloo",
          "outer_syncs_per_round": multi["updates_per_round"],
          "loss_gap_vs_single": sig(gap), "loss_gap_final_round": sig(final_gap),
          "loss_gap_max_round": sig(round_gap),
          "server_bytes_vs_single": round(multi["server_bytes_per_round"]
                                          / single["server_bytes_per_round"], 4),
          "final_eval_loss": {"single": single["final_eval_loss"],
                              "multi": multi["final_eval_loss"]},
          "outer": "nesterov" if args.nesterov else "average",
          "wall_s": {"single": round(single["wall_s"], 1), "multi": round(multi["wall_s"], 1)},
          **({"flavour": flavour} if flavour else {}), **extra})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
