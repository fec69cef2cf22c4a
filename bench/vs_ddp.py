"""DiLoCo through the real system against PyTorch DDP, for the same model, data and tokens.

    python -m bench.vs_ddp [--quick] [--fresh] [--models gpt-tiny,mlp-digits] [--out-dir DIR]

For each model: DDP (4 gloo processes, all-reduce every step) and DDP + the PowerSGD hook
(bench/ddp_worker.py); then the REAL server and 4 REAL native nodes (subprocesses, WebSocket
transport, signed frames) for DiLoCo with H inner steps and the codecs raw32, int8-block and
top-k 1% (int8 values) + error feedback. Same zoo model and init seed, same data and shards
(`--n-shards` = workers, so node i and DDP rank i train on the same quarter), same AdamW
settings and per-worker batch, same steps per worker, hence the same total tokens.

Bytes are counted at the transport: the whole benchmark re-runs itself inside a private
network namespace (`unshare -n`, when root), so the `lo` counters of /proc/net/dev see only
its own traffic (TCP/IP headers included); the server's per-peer counts (WebSocket message
payloads: our framing + signatures, no WebSocket/TCP/IP headers) are reported beside them.
A WAN of 100 Mbit/s and 50 ms one-way latency per worker is MODELLED (no tc netem here):
measured compute + measured bytes / bandwidth + latency x sequential messages.
Finished configurations are cached (`<out-dir>/vs_ddp-cache.json`, keyed by the configuration
and a digest of the code it runs; `--fresh` ignores it). The LAST stdout line is JSON
(bench.common.emit); its "from_cache" lists the configurations read from the cache.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, children, code_digest, emit, free_port, get_json
from bench.ddp_worker import lo_counters, load_workload, run_ddp
from bench.error_feedback import SPARSE_OUTER, TOPK
from bench.vs_ddp_sparse import (
    SPARSE_CODECS,
    SPARSE_REPEATS,
    SPARSE_RUNS,
    config_name,
    down_over_up,
    merge_repeats,
    repeat_keys,
    sparse_figures,
    with_raw32,
)
from bench.vs_ddp_sparse import (
    targets_md as sparse_targets_md,
)

NETNS_ENV = "DAA_VS_DDP_NETNS"
BW_BYTES_S = 100e6 / 8  # 100 Mbit/s per worker, each direction
LATENCY_S = 0.050  # one way
DILOCO_HOPS = 2  # sequential one-way messages per round: RoundOpen down, Submit up
CODECS: dict[str, list[str]] = {
    "raw32": ["--codec", "raw32"],
    "int8-block": ["--codec", "int8-block"],
    "topk-ef": [*TOPK, *SPARSE_OUTER, "--error-feedback"],
    # plain parameter averaging (outer lr 1, no momentum): the small-data model's outer step
    "raw32-avg": ["--codec", "raw32", "--outer-lr", "1.0", "--outer-momentum", "0.0"],
    **SPARSE_CODECS,  # sparseloco-H<steps>: bench.vs_ddp_sparse
}


@dataclass(frozen=True)
class Grid:
    model: str
    flavour: str | None
    workers: int
    steps: int  # inner steps per worker (= DDP steps)
    batch_size: int  # per worker
    lr: float
    runs: tuple[tuple[int, str], ...]  # DiLoCo (H, codec)
    eval_every: int  # DDP snapshot interval (steps)
    ddp_hooks: tuple[str, ...] = ("allreduce", "powersgd")
    psgd_rank: int = 4
    psgd_start: int = 20
    seed: int = 0


def full_grids() -> list[Grid]:
    gpt = tuple((h, c) for h in (10, 50, 100, 500) for c in ("raw32", "int8-block", "topk-ef"))
    gpt += SPARSE_RUNS  # (H, codec) of the sparseloco configurations: bench.vs_ddp_sparse
    mlp = ((10, "raw32"), (50, "raw32"), (100, "raw32"), (50, "int8-block"), (50, "topk-ef"),
           (10, "raw32-avg"), (50, "raw32-avg"))
    return [Grid("gpt-tiny", "nano", 4, 2000, 16, 0.01, gpt, 50),
            Grid("mlp-digits", None, 4, 500, 32, 0.01, mlp, 25, psgd_start=10)]


def quick_grids(sparse: bool = False) -> list[Grid]:
    """mlp-digits, 2 workers, 20 steps; `sparse` (--only sparseloco) adds sparseloco-H10."""
    runs = ((10, "raw32"), (10, "sparseloco")) if sparse else ((10, "raw32"),)
    return [Grid("mlp-digits", None, 2, 20, 32, 0.01, runs, 10, ddp_hooks=("allreduce",))]


# -- running one configuration -----------------------------------------------------------
def run_diloco(tmp: Path, g: Grid, h: int, codec: str, timeout: float, *,
               extra_flags: tuple[str, ...] = (),
               via: Callable[[int], AbstractContextManager[int]] | None = None
               ) -> dict[str, Any]:
    """The real server + g.workers native nodes; waits for the nodes to leave (no polling
    while they train, so the lo counters hold only the run's own traffic). `via(port)`, when
    given, puts a link between them (bench.overlap): it yields the port the nodes join."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    rounds = g.steps // h
    flags = ["--model", g.model, "--seed", str(g.seed), "--n-shards", str(g.workers),
             "--inner-steps", str(h), "--inner-lr", str(g.lr), "--batch-size",
             str(g.batch_size), "--deadline-s", "900", *CODECS[codec], *extra_flags]
    if g.flavour:
        flags += ["--flavour", g.flavour]
    t0 = time.monotonic()
    with children(tmp) as spawn:
        server = spawn("server", "-m", "server", "--data-dir", str(tmp / "run"), "--port",
                       str(port), "--rounds", str(rounds), "--quorum", str(g.workers), *flags)
        deadline = time.monotonic() + 120
        while True:  # wait until it answers, then start the nodes
            try:
                get_json(base + "/api/run")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start; see {tmp}/server.log") from None
                time.sleep(0.2)
        tx0, _ = lo_counters()
        with (via or contextlib.nullcontext)(port) as join_port:
            nodes = [spawn(f"node{i}", "-m", "native_node", "join", "--coordinator",
                           f"127.0.0.1:{join_port}", "--state-dir", str(tmp / f"node{i}"),
                           "--threads", "1", "--quiet") for i in range(g.workers)]
            for node in nodes:
                while node.poll() is None:
                    if server.poll() is not None or time.monotonic() - t0 > timeout:
                        raise RuntimeError(f"DiLoCo run failed or timed out; logs in {tmp}")
                    time.sleep(0.2 if via else 0.5)
        tx1, _ = lo_counters()
        wall_total = time.monotonic() - t0
        run = get_json(base + "/api/run")
        if run["status"] != "finished":
            raise RuntimeError(f"nodes left before the run finished; logs in {tmp}")
        peers = [p for p in get_json(base + "/api/peers") if p["role"] == "trainer"]
        rows = get_json(base + f"/api/rounds?limit={rounds + 10}")
    db = sqlite3.connect(tmp / "run" / "run.sqlite")
    comp = np.zeros((rounds, g.workers))
    ids = sorted(p["node_id"] for p in peers)
    for r, node, c in db.execute("SELECT round, node_id, compute_s FROM updates"):
        comp[r, ids.index(node)] = c
    db.close()
    return {"run": run, "peers": peers, "rounds": rows, "compute": comp,
            "lo_tx_bytes": tx1 - tx0, "wall_total_s": wall_total}


def summarize_diloco(g: Grid, h: int, codec: str, out: dict[str, Any],
                     netns: bool) -> dict[str, Any]:
    rows, comp, peers, run = out["rounds"], out["compute"], out["peers"], out["run"]
    n = g.workers
    up = float(np.mean([p["bytes_up"] for p in peers]))
    down = float(np.mean([p["bytes_down"] for p in peers]))
    transport = out["lo_tx_bytes"] / n if netns else up + down  # star: each byte crosses one
    # worker link once (lo counts every packet once; node <-> server only)
    payload_r = np.array([(r["bytes_up"] + r["bytes_down"]) / n for r in rows], dtype=float)
    bytes_r = payload_r * (transport / max(1.0, payload_r.sum()))
    crit = comp.max(axis=1)  # a round waits for its slowest node
    wan_r = crit + bytes_r / BW_BYTES_S + DILOCO_HOPS * LATENCY_S
    dur = np.array([r["duration_s"] for r in rows], dtype=float)
    # round 0 also waits for the nodes to start: charge it the mean overhead of the others
    overhead = float(np.mean(dur[1:] - crit[1:])) if len(dur) > 1 else 0.0
    wall = float(dur[1:].sum() + crit[0] + overhead)
    compute = float(comp.sum(axis=0).mean())
    losses = [r["eval_loss"] for r in rows]
    curve = [[0, 0.0, 0.0, run["eval_loss_init"]]]
    curve += [[(i + 1) * h, float(bytes_r[: i + 1].sum()), float(wan_r[: i + 1].sum()), loss]
              for i, loss in enumerate(losses)]
    return {"system": "diloco", "H": h, "codec": codec, "rounds": len(rows),
            "final_eval_loss": losses[-1], "entropy_floor": run["entropy_floor"],
            "bytes_up_payload": up, "bytes_down_payload": down, "bytes_transport": transport,
            "messages_critical": DILOCO_HOPS * len(rows), "compute_s": compute, "wall_s": wall,
            "wall_total_s": out["wall_total_s"], "utilization": compute / wall,
            "wan_time_s": float(wan_r.sum()), "wan_utilization": compute / float(wan_r.sum()),
            "down_over_up": down_over_up(rows), "down_over_up_with_join": down / up,
            "curve": curve}


def summarize_ddp(g: Grid, hook: str, out: dict[str, Any], netns: bool,
                  losses: list[float]) -> dict[str, Any]:
    ranks, n = out["ranks"], g.workers
    comp = np.array([r["compute_s"] for r in ranks])  # [workers, steps]
    ar_bytes = np.array(ranks[0]["all_reduce_bytes"], dtype=float)
    ar_calls = np.array(ranks[0]["all_reduce_calls"], dtype=float)
    ring = 2 * (n - 1) / n  # bytes each worker sends (and receives) per all-reduced byte
    per_dir = out["lo_tx_bytes"] / n if netns else float(ar_bytes.sum() * ring)
    step_dir = ar_bytes / max(1.0, ar_bytes.sum()) * per_dir
    hops = 2 * max(1, int(np.ceil(np.log2(n))))  # latency-optimal all-reduce: kind to DDP
    wan_s = comp.max(axis=0) + step_dir / BW_BYTES_S + ar_calls * hops * LATENCY_S
    wall = max(r["t_end"] for r in ranks) - min(r["t_start"] for r in ranks)
    compute = float(comp.sum(axis=1).mean())
    steps_at = [0, *[min(g.steps, (i + 1) * g.eval_every) for i in range(len(losses) - 1)]]
    curve = [[s, float(2 * step_dir[:s].sum()), float(wan_s[:s].sum()), loss]
             for s, loss in zip(steps_at, losses, strict=True)]
    return {"system": "ddp" if hook == "allreduce" else "ddp-powersgd", "H": 1,
            "codec": "fp32 all-reduce" if hook == "allreduce" else f"PowerSGD r{g.psgd_rank}",
            "rounds": g.steps, "final_eval_loss": losses[-1], "entropy_floor": None,
            "bytes_up_payload": float(ar_bytes.sum() * ring),
            "bytes_down_payload": float(ar_bytes.sum() * ring), "bytes_transport": 2 * per_dir,
            "messages_critical": float(ar_calls.sum() * hops), "compute_s": compute,
            "wall_s": wall, "wall_total_s": out["wall_total_s"], "utilization": compute / wall,
            "wan_time_s": float(wan_s.sum()), "wan_utilization": compute / float(wan_s.sum()),
            "curve": curve}


# -- the grid, the cache, progress -------------------------------------------------------
# the code each kind of configuration runs (and this file, whose summaries are what is cached)
MEASURED_DDP = ("bench/ddp_worker.py", "bench/vs_ddp.py", "ml")
MEASURED_DILOCO = ("bench/vs_ddp.py", "bench/vs_ddp_sparse.py", "server", "native_node",
                   "shared", "ml", "transport")


def config_key(g: Grid, name: str, netns: bool) -> str:
    """The cache key: the configuration and a digest of the code that runs it."""
    code = code_digest(*(MEASURED_DDP if name.startswith("ddp-") else MEASURED_DILOCO))
    d = {**asdict(g), "runs": None, "ddp_hooks": None, "netns": netns, "code": code}
    return f"{g.model}/{name}/" + hashlib.sha256(json.dumps(d, sort_keys=True).encode()
                                                 ).hexdigest()[:12]


def estimate_s(g: Grid, h: int) -> float:
    step = 0.03 if g.model == "gpt-tiny" else 0.003
    return 15 + g.steps * g.workers * step / 2 + (g.steps / h) * 0.4


class Progress:
    def __init__(self, total_s: float) -> None:
        self.total, self.done, self.t0 = total_s, 0.0, time.monotonic()

    def step(self, what: str, est: float) -> None:
        self.done += est
        spent = time.monotonic() - self.t0
        eta = spent / max(self.done, 1e-9) * (self.total - self.done)
        print(f"[vs_ddp {spent:6.0f} s] {what}; ETA {eta:.0f} s", file=sys.stderr, flush=True)


def run_grid(grids: list[Grid], *, cache_path: Path, fresh: bool, netns: bool,
             timeout: float, only: list[str] | None = None, cached_only: bool = False,
             repeats: int = 1
             ) -> tuple[dict[str, list[dict[str, Any]]], list[str], list[str]]:
    """(results by model, configurations not run, configurations read from the cache).
    `repeats`: runs of each DiLoCo configuration, merged (bench.vs_ddp_sparse.merge_repeats)."""
    cache: dict[str, Any] = {}
    if cache_path.exists() and not fresh:
        cache = json.loads(cache_path.read_text())
    todo = [(g, f"ddp-{k}", 1) for g in grids for k in g.ddp_hooks]
    todo += [(g, config_name(h, c), h) for g in grids for h, c in g.runs]
    codec_of = {config_name(h, c): c for g in grids for h, c in g.runs}
    if only:
        picked = [t[1] for t in todo if any(o in t[1] for o in only)]
        picked += [n for g in grids for n in with_raw32(picked, g.runs)]  # compare at same H
        todo = [t for t in todo if t[1].startswith("ddp-allreduce") or t[1] in picked]
    # cheap first, so that an interrupted run has the most configurations
    todo.sort(key=lambda t: (t[2] > 1, estimate_s(t[0], t[2])))
    if only:  # ... or in the order asked for
        todo.sort(key=lambda t: (t[2] > 1, min((i for i, o in enumerate(only) if o in t[1]),
                                               default=-1)))
    def reps(name: str) -> int:
        return 1 if name.startswith("ddp-") else repeats

    from_cache = [f"{g.model}/{name}{k.removeprefix(config_key(g, name, netns))}"
                  for g, name, _ in todo
                  for k in repeat_keys(config_key(g, name, netns), reps(name)) if k in cache]
    prog = Progress(sum(estimate_s(g, h) for g, name, h in todo
                        for k in repeat_keys(config_key(g, name, netns), reps(name))
                        if k not in cache))
    tmp = Path(tempfile.mkdtemp(prefix="daa-vs-ddp-"))
    results: dict[str, list[dict[str, Any]]] = {g.model: [] for g in grids}
    workloads: dict[str, Any] = {}
    keys = {(g.model, name): config_key(g, name, netns) for g, name, _ in todo}  # the code as
    todo_runs = [(g, name, h, repeat_keys(keys[(g.model, name)], reps(name))[i])  # it was
                 for i in range(repeats) for g, name, h in todo if i < reps(name)]  # when the
    if repeats > 1:  # the repeated comparison first, DDP (its one run) last
        todo_runs.sort(key=lambda t: t[1].startswith("ddp-"))
    for g, name, h, key in todo_runs:  # run began: others may edit the tree meanwhile
        if key not in cache and not cached_only:
            t0 = time.monotonic()
            where = tmp / key.replace("/", "_")
            if name.startswith("ddp-"):
                hook = name.removeprefix("ddp-")
                out = run_ddp(where, model=g.model, flavour=g.flavour, seed=g.seed,
                              workers=g.workers, steps=g.steps, batch_size=g.batch_size,
                              lr=g.lr, hook=hook, eval_every=g.eval_every,
                              psgd_rank=g.psgd_rank, psgd_start=g.psgd_start, timeout=timeout)
                work = workloads.get(g.model) or load_workload(g.model, g.flavour, g.seed)
                workloads[g.model] = work
                res = summarize_ddp(g, hook, out, netns, evaluate_all(work, out["snapshots"]))
                res["entropy_floor"] = work.dataset.entropy_floor
            else:
                codec = codec_of[name]
                res = summarize_diloco(g, h, codec, run_diloco(where, g, h, codec, timeout),
                                       netns)
            res.update(config=name, model=g.model, run_s=time.monotonic() - t0)
            cache[key] = res
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache))
            prog.step(f"{g.model} {name}: eval loss {res['final_eval_loss']:.4f}, "
                      f"{res['bytes_transport'] / 1e6:.2f} MB/worker, "
                      f"{res['run_s']:.0f} s", estimate_s(g, h))
    shutil.rmtree(tmp, ignore_errors=True)
    order = {(g.model, name): i for i, (g, name) in enumerate(
        [(g, f"ddp-{k}") for g in grids for k in g.ddp_hooks]
        + [(g, config_name(h, c)) for g in grids for h in sorted({h for h, _ in g.runs})
           for c in CODECS if (h, c) in g.runs])}
    missing = []
    for g, name, _ in sorted(todo, key=lambda t: order[(t[0].model, t[1])]):
        runs = [cache[k] for k in repeat_keys(keys[(g.model, name)], reps(name)) if k in cache]
        if len(runs) == reps(name):
            results[g.model].append(merge_repeats(runs))
        else:
            missing.append(f"{g.model}/{name}")
    return results, missing, from_cache


def evaluate_all(work: Any, snaps: np.ndarray) -> list[float]:
    from ml.zoo import evaluate, load_flat

    net, ds = work.new_model(), work.dataset
    out = []
    for theta in snaps:
        load_flat(net, theta)
        out.append(evaluate(net, ds.x_val, ds.y_val))
    return out


def in_netns(argv: list[str]) -> int | None:
    """Re-run this command inside a private network namespace; None when not possible."""
    if os.environ.get(NETNS_ENV) or os.geteuid() != 0:
        return None
    if not (shutil.which("unshare") and shutil.which("ip")):
        return None
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
           sys.executable, "-m", "bench.vs_ddp", *argv]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, NETNS_ENV: "1"}).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.vs_ddp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny grid (mlp-digits, 2 workers)")
    p.add_argument("--fresh", action="store_true", help="ignore cached configurations")
    p.add_argument("--models", default=None, help="comma list (default: all of the grid)")
    p.add_argument("--out-dir", default=None,
                   help="outputs + cache (default bench/results; --quick: a temp folder)")
    p.add_argument("--no-netns", action="store_true",
                   help="do not re-run inside a private network namespace")
    p.add_argument("--timeout", type=float, default=1800.0, help="per configuration, s")
    p.add_argument("--only", default=None,
                   help="comma list of substrings of config names to run (DDP always runs)")
    p.add_argument("--cached-only", action="store_true",
                   help="report the cached configurations only (listed as not_run otherwise)")
    p.add_argument("--steps", type=int, default=None,
                   help="override the steps per worker (drops H above it; for trials)")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs of each DiLoCo configuration, mean and spread reported (default:"
                        f" {SPARSE_REPEATS} with --only sparseloco on the full grid, else 1)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = (SPARSE_REPEATS if "sparseloco" in (args.only or "") and not args.quick
                        else 1)
    if not args.no_netns:
        rc = in_netns(argv)
        if rc is not None:
            return rc
    netns = bool(os.environ.get(NETNS_ENV))
    grids = (quick_grids("sparseloco" in (args.only or "")) if args.quick else full_grids())
    if args.models:
        grids = [g for g in grids if g.model in args.models.split(",")]
    if args.steps:
        grids = [replace(g, steps=args.steps, runs=tuple((h, c) for h, c in g.runs
                                                         if h <= args.steps)) for g in grids]
    out_dir = Path(args.out_dir) if args.out_dir else (
        Path(tempfile.mkdtemp(prefix="daa-vs-ddp-quick-")) if args.quick
        else ROOT / "bench" / "results")
    t0 = time.monotonic()
    results, missing, from_cache = run_grid(
        grids, cache_path=out_dir / "vs_ddp-cache.json", fresh=args.fresh, netns=netns,
        timeout=args.timeout, only=args.only.split(",") if args.only else None,
        cached_only=args.cached_only, repeats=args.repeats)
    figs = figures(grids, results, netns=netns)
    figs["wall_s"] = round(time.monotonic() - t0, 1)
    figs["not_run"] = missing
    figs["from_cache"] = from_cache  # configurations not run now: read from the cache
    figs["repeats"] = args.repeats
    figs["configs_run_s"] = round(sum(r["run_s"] for rs in results.values() for r in rs), 1)
    write_outputs(out_dir, grids, results, figs, wall_s=time.monotonic() - t0,
                  command="python -m bench.vs_ddp " + " ".join(argv),
                  stem="vs_ddp" + "".join(f"_{o}" for o in (args.only or "").split(",") if o))
    emit(figs)
    return 0


# -- figures, tables, plots --------------------------------------------------------------
def _rel(a: float, b: float) -> float:
    return (a - b) / b


def _time_to(curve: list[list[float]], target: float) -> float | None:
    return next((pt[2] for pt in curve if pt[3] is not None and pt[3] <= target), None)


def model_figures(results: list[dict[str, Any]]) -> dict[str, Any]:
    ddp = next(r for r in results if r["system"] == "ddp")
    target = ddp["final_eval_loss"] * 1.03
    for r in results:
        r["loss_gap_vs_ddp"] = _rel(r["final_eval_loss"], ddp["final_eval_loss"])
        r["bytes_ratio_vs_ddp"] = ddp["bytes_transport"] / r["bytes_transport"]
        r["wan_time_to_target_s"] = _time_to(r["curve"], target)
        if r["system"] == "diloco":  # what if RoundOpen carried a download as small as the
            up, down = r["bytes_up_payload"], r["bytes_down_payload"]  # upload
            r["bytes_ratio_if_down_like_up"] = ddp["bytes_transport"] / (
                r["bytes_transport"] * 2 * up / (up + down))
    dil = [r for r in results if r["system"] == "diloco"]
    ok = [r for r in dil if r["loss_gap_vs_ddp"] <= 0.03]
    best = (max(ok, key=lambda r: r["bytes_ratio_vs_ddp"]) if ok
            else min(dil, key=lambda r: r["loss_gap_vs_ddp"]))
    raw = {r["H"]: r for r in dil if r["codec"] == "raw32"}
    comp = []
    for r in dil:
        if r["codec"] != "raw32" and r["H"] in raw:
            base = raw[r["H"]]
            r["compression_savings"] = 1 - r["bytes_transport"] / base["bytes_transport"]
            r["compression_savings_up"] = 1 - r["bytes_up_payload"] / base["bytes_up_payload"]
            r["compression_loss_gap"] = _rel(r["final_eval_loss"], base["final_eval_loss"])
            comp.append(r)
    c_ok = [r for r in comp if r["compression_loss_gap"] <= 0.01]
    cbest = (max(c_ok, key=lambda r: r["compression_savings"]) if c_ok
             else min(comp, key=lambda r: r["compression_loss_gap"]) if comp else None)
    return {
        "best": {"config": best["config"], "bytes_ratio_vs_ddp": best["bytes_ratio_vs_ddp"],
                 "loss_gap_vs_ddp": best["loss_gap_vs_ddp"],
                 "utilization_wan": best["wan_utilization"],
                 "bytes_ratio_if_down_like_up": best["bytes_ratio_if_down_like_up"],
                 "down_over_up": best.get("down_over_up"),
                 "wan_time_to_target_s": best["wan_time_to_target_s"],
                 "chosen_by": "most bytes saved within 3% of DDP's loss" if ok
                 else "none within 3% of DDP: the lowest loss"},
        "compression_config": cbest["config"] if cbest else None,
        "compression_savings": cbest["compression_savings"] if cbest else None,
        "compression_savings_up": cbest["compression_savings_up"] if cbest else None,
        "compression_loss_gap": cbest["compression_loss_gap"] if cbest else None,
        "ddp_final_eval_loss": ddp["final_eval_loss"],
        "ddp_bytes_per_worker": ddp["bytes_transport"],
        "ddp_utilization_wan": ddp["wan_utilization"],
        "ddp_wan_time_to_target_s": ddp["wan_time_to_target_s"],
        "ddp_utilization_loopback": ddp["utilization"],
        "target_loss": target,
        "sparseloco": sparse_figures(results),
    }


def figures(grids: list[Grid], results: dict[str, list[dict[str, Any]]], *,
            netns: bool) -> dict[str, Any]:
    per = {g.model: model_figures(results[g.model]) for g in grids}
    main_fig = per[grids[0].model]
    best, gap = main_fig["best"], main_fig["compression_loss_gap"]
    sav = main_fig["compression_savings"]
    return {**main_fig, "model": grids[0].model, "models": per, "wan_method": "model",
            "settings": {g.model: {**asdict(g), "runs": [f"H{h}-{c}" for h, c in g.runs]}
                         for g in grids},
            "wan_link": {"mbit_s": BW_BYTES_S * 8 / 1e6, "latency_ms": LATENCY_S * 1e3},
            "bytes_method": "lo counters in a private netns (TCP/IP headers included)" if netns
            else "server payload counts; DDP: all-reduce bytes x 2(n-1)/n (no headers)",
            "targets": {
                "bytes_ratio_500x": best["bytes_ratio_vs_ddp"] >= 500,
                "loss_within_3pct": best["loss_gap_vs_ddp"] <= 0.03,
                "compression_savings_92pct": sav is not None and sav >= 0.92,
                "compression_gap_1pct": gap is not None and gap <= 0.01,
                "utilization_wan_90pct": best["utilization_wan"] >= 0.90}}


COLS = [("config", "config"), ("final_eval_loss", "eval loss"), ("gap_floor", "gap to floor"),
        ("loss_gap_vs_ddp", "vs DDP"), ("bytes_transport", "MB/worker (transport)"),
        ("bytes_up_payload", "up MB (payload)"), ("bytes_down_payload", "down MB (payload)"),
        ("bytes_ratio_vs_ddp", "fewer bytes than DDP"),
        ("bytes_ratio_if_down_like_up", "... if down = up"), ("compute_s", "compute s"),
        ("wall_s", "wall s"), ("utilization", "util. loopback"), ("wan_time_s", "WAN s (model)"),
        ("wan_utilization", "util. WAN"), ("wan_time_to_target_s", "WAN s to target")]


def _cell(key: str, r: dict[str, Any]) -> str:
    v = r.get(key)
    if key == "gap_floor":
        v = None if r["entropy_floor"] is None else r["final_eval_loss"] - r["entropy_floor"]
    if v is None:
        return "not reached" if key == "wan_time_to_target_s" else "—"
    if key.startswith("bytes_") and not key.startswith("bytes_ratio"):
        return f"{v / 1e6:,.2f}"
    if key in ("loss_gap_vs_ddp", "utilization", "wan_utilization"):
        return f"{100 * v:+.1f}%" if key == "loss_gap_vs_ddp" else f"{100 * v:.1f}%"
    if key.startswith("bytes_ratio"):
        return f"{v:,.1f}x"
    if key.endswith("loss") or key == "gap_floor":
        return f"{v:,.4f}"
    return f"{v:,.1f}" if isinstance(v, float) else str(v)


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| " + " | ".join(h for _, h in COLS) + " |", "|" + "---|" * len(COLS)]
    out += ["| " + " | ".join(_cell(k, r) for k, _ in COLS) + " |" for r in rows]
    return "\n".join(out)


def plots(out_dir: Path, grids: list[Grid], results: dict[str, list[dict[str, Any]]],
          stem: str = "vs_ddp") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, xi, xlabel in (("bytes", 1, "bytes communicated per worker (transport)"),
                             ("wan_time", 2, "emulated wall time, s (model: 100 Mbit/s, "
                                             "50 ms)")):
        fig, axes = plt.subplots(1, len(grids), figsize=(7 * len(grids), 5), squeeze=False)
        for ax, g in zip(axes[0], grids, strict=True):
            colors = {10: "tab:blue", 50: "tab:orange", 100: "tab:green", 500: "tab:red"}
            for r in results[g.model]:
                pts = [(pt[xi], pt[3]) for pt in r["curve"] if pt[xi] > 0]
                ddp = r["system"] != "diloco"
                color = ("black" if r["system"] == "ddp" else "gray" if ddp
                         else colors.get(r["H"], "tab:purple"))
                ax.plot(*zip(*pts, strict=True), label=r["config"], lw=2.5 if ddp else 1.3,
                        color=color, marker="o", ms=2,
                        ls="-" if ddp or r["codec"] == "raw32" else
                        "--" if r["codec"] == "int8-block" else ":")
            ddp_loss = next(r for r in results[g.model] if r["system"] == "ddp")
            ax.axhline(1.03 * ddp_loss["final_eval_loss"], color="black", lw=0.8, ls=":",
                       label="target: DDP's final loss x 1.03")
            if ddp_loss["entropy_floor"] is not None:
                ax.axhline(ddp_loss["entropy_floor"], color="gray", lw=0.8, ls="--",
                           label="entropy floor")
            ax.set_xscale("log")
            ax.set_title(f"{g.model} ({g.workers} workers, {g.steps} steps x batch "
                         f"{g.batch_size} each)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("eval loss (nats)")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}_loss_vs_{name}.png", dpi=110)
        plt.close(fig)


def targets_md(f: dict[str, Any]) -> list[str]:
    b, t = f["best"], f["targets"]
    sav, gap = f["compression_savings"], f["compression_loss_gap"]

    def mark(ok: bool) -> str:
        return "met" if ok else "**missed**"

    out = [f"## Targets ({f['model']}; best = {b['config']}, chosen by: {b['chosen_by']})", "",
           "| target | measured | |", "|---|---|---|",
           f"| >= 500x fewer bytes per worker than DDP | {b['bytes_ratio_vs_ddp']:,.1f}x "
           f"(with a download as small as the upload: {b['bytes_ratio_if_down_like_up']:,.0f}x)"
           f" | {mark(t['bytes_ratio_500x'])} |",
           f"| final eval loss within 3% of DDP's ({f['ddp_final_eval_loss']:.4f}) | "
           f"{100 * b['loss_gap_vs_ddp']:+.2f}% | {mark(t['loss_within_3pct'])} |"]
    if sav is not None and gap is not None:
        out += [f"| compression saves >= 92% of raw32 DiLoCo's bytes ({f['compression_config']})"
                f" | {100 * sav:.1f}% (upload alone: {100 * f['compression_savings_up']:.1f}%) | "
                f"{mark(t['compression_savings_92pct'])} |",
                f"| ... at a loss gap <= 1% | {100 * gap:+.2f}% | "
                f"{mark(t['compression_gap_1pct'])} |"]
    out += [f"| compute utilization on the modelled WAN >= 90% | {100 * b['utilization_wan']:.1f}%"
            f" (DDP: {100 * f['ddp_utilization_wan']:.1f}%) | "
            f"{mark(t['utilization_wan_90pct'])} |", "",
            f"Time to the target loss {f['target_loss']:.4f} (DDP's final x 1.03) on the modelled "
            f"WAN: DDP {_secs(f['ddp_wan_time_to_target_s'])}, {b['config']} "
            f"{_secs(b['wan_time_to_target_s'])}.", "", *NOTES]
    return out


def _secs(v: float | None) -> str:
    return "not reached" if v is None else f"{v:,.0f} s"


NOTES = [
    "How it is measured:",
    "",
    "- *MB/worker (transport)*: bytes through one worker's link, sent + received, counted by "
    "the `lo` interface of a private network namespace (TCP/IP headers and ACKs included; lo's "
    "MTU is 65536, so fewer headers than on a 1500-byte WAN). DiLoCo: lo total / workers "
    "(every byte goes node <-> server). DDP: 2 x lo total / workers (every byte one worker "
    "sends, another receives). Rendezvous and the initial broadcast are included.",
    "- *up / down (payload)*: DiLoCo: the server's per-peer counts (whole WebSocket messages: "
    "our framing, JSON header, signatures; no WebSocket or TCP/IP headers), mean over nodes. "
    "The down column is mostly RoundOpen: the full float32 params (4 bytes/param/round), or, "
    "to a node that holds the previous params, only the coordinates that changed (the delta "
    "downlink, used when under half changed): with Nesterov outer momentum (raw32, int8-block) "
    "every coordinate moves, so the download stays full; with top-k and no outer momentum only "
    "the aggregated top-k coordinates do. DDP: all-reduced tensor bytes x 2(n-1)/n (ring), "
    "each way. *... if down = up*: the ratio if the download were as small as the upload.",
    "- *compute*: seconds in forward/backward/clip/optimizer per worker (nodes: `compute_s` of "
    "their updates; DDP: step time minus the comm hook's time: compression + all-reduce wait). "
    "4 workers share 2 cores, so every step is ~2x slower than alone, for both systems.",
    "- *wall*: training time (DiLoCo: the round durations; round 0's wait for the nodes to "
    "start is replaced by the other rounds' mean overhead; DDP: first step to last step).",
    "- *WAN (model)*: DiLoCo: per round, the slowest node's compute + that round's bytes / 100 "
    "Mbit/s + 2 x 50 ms (RoundOpen down, Submit up; Ack and RoundCommitted overlap them); the "
    "server's link is assumed fast. DDP: per step, the slowest worker's compute + bytes each "
    "way / 100 Mbit/s (full duplex) + all-reduce calls x 2 log2(n) x 50 ms (the latency-optimal "
    "all-reduce, kind to DDP; gloo's ring would be 2(n-1) hops). Utilization = mean compute / "
    "modelled time. Server aggregation/evaluation and node encode/sign time are not modelled.",
    "- DiLoCo outer step: Nesterov lr 0.7, momentum 0.9 (raw32, int8-block); top-k + error "
    "feedback uses lr 1.0, momentum 0 (bench.error_feedback: Nesterov diverges with EF).",
    "- Nodes seed their batch order from their random node id; DDP rank r uses seed r. Same "
    "model init (seed 0), same data and shards (shard i of n for node/rank i). One seed each.",
]


def settings_line(g: Grid) -> str:
    return (f"{g.model} ({g.flavour or 'default'}): {g.workers} workers x {g.steps} steps x "
            f"batch {g.batch_size} ({g.workers * g.steps * g.batch_size:,} samples in all), "
            f"AdamW lr {g.lr}, seed {g.seed}; DDP evaluated every {g.eval_every} steps; "
            f"PowerSGD rank {g.psgd_rank} from step {g.psgd_start}")


def write_outputs(out_dir: Path, grids: list[Grid], results: dict[str, list[dict[str, Any]]],
                  figs: dict[str, Any], *, wall_s: float, command: str,
                  stem: str = "vs_ddp") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# bench.vs_ddp: `{command}`", "",
             f"wan_method: model ({BW_BYTES_S * 8 / 1e6:.0f} Mbit/s, {LATENCY_S * 1e3:.0f} ms "
             f"one way, per worker); bytes: {figs['bytes_method']}; configurations' run times "
             f"(start-up included) sum to {figs['configs_run_s']:.0f} s; this invocation "
             f"{wall_s:.0f} s", ""]
    for g in grids:
        lines += [f"## {settings_line(g)}", "", table(results[g.model]), ""]
    if figs["not_run"]:
        lines += [f"Not run (time): {', '.join(figs['not_run'])}", ""]
    lines += targets_md(figs)
    if figs.get("sparseloco"):
        lines += ["", *sparse_targets_md(figs["sparseloco"])]
    (out_dir / f"{stem}.md").write_text("\n".join(lines))
    slim = {m: [{k: v for k, v in r.items() if k != "curve"} for r in rs]
            for m, rs in results.items()}
    (out_dir / f"{stem}.json").write_text(json.dumps({"figures": figs, "configs": slim},
                                                    indent=1, sort_keys=True))
    plots(out_dir, grids, results, stem)
    for g in grids:
        print(settings_line(g))
        print(table(results[g.model]))


if __name__ == "__main__":
    raise SystemExit(main())
