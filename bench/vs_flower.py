"""Our simulation beside Flower's Ray simulation: the same 1,000-client rounds, same machine.

    python -m bench.vs_flower [--clients 1000] [--rounds 3] [--inner-steps 50]
        [--venv ~/.cache/daa-prime/venv-flwr] [--skip-flower] [--engines ray,asyncio]

Flower (flwr[simulation] FLWR_VERSION, its own Ray) lives in its own virtual environment,
created on first use (--venv; `pip install torch==TORCH flwr[simulation]==FLWR scikit-learn`),
never in the project's. Its side is bench.flower_side, run by that venv's python from the
repository root: FedAvg over --clients virtual supernodes, each running our node's local work.

Ours is `python -m bench.simulate` (the real coordinator, every node a shared.participant
Participant with its own ML-DSA-65 key, signed and verified Submits) with the same work per
client: mlp-digits, one iid shard per node, --inner-steps AdamW steps of batch 32 from a fresh
optimizer (--opt-state fresh, as a stateless Flower client), aggregator mean. It runs on each
engine in --engines: `ray` (participants on Ray workers, as Flower's clients are) and
`asyncio` (one process).

Each side runs as a child process; its peak memory is the simultaneous peak of the summed
resident sets of its whole process tree (bench.proctree: driver, Ray's daemons, workers),
sampled every 0.5 s. Per-round seconds: ours from bench.simulate's table (round open to
commit); Flower's between its centralized evaluations after each round (its first round also
starts its Ray actors: round_s_after_first leaves it out). setup_s: the rest of the wall
time (ours: keys and the signed join of every node; both: starting Ray).

Prints a table and, LAST, JSON: {"flower": {...}, "ours": {...} (the ray engine),
"ours_asyncio": {...}, "clients", "rounds", "inner_steps", "ratio_round_s", "ratio_peak"}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.proctree import PeakSampler

REPO = Path(__file__).resolve().parents[1]
FLWR_VERSION = "1.42.0"
TORCH_VERSION = "2.13.0"  # the CPU wheel on disk here (see the project notes)
DEFAULT_VENV = Path.home() / ".cache" / "daa-prime" / "venv-flwr"
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
             "FLWR_TELEMETRY_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
             "OMP_NUM_THREADS": "1"}


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def flower_missing(venv: Path) -> str | None:
    """Why Flower's side cannot run from `venv`, or None."""
    py = venv_python(venv)
    if not py.exists():
        return f"no Flower venv at {venv} (python -m bench.vs_flower --setup creates it)"
    probe = subprocess.run([str(py), "-c", "from importlib.metadata import version as v; "
                            "[v(p) for p in ('flwr', 'ray', 'torch', 'scikit-learn')]"],
                           capture_output=True, text=True, check=False)  # installed, not imported
    return None if probe.returncode == 0 else f"Flower venv {venv} is incomplete: " \
        f"{probe.stderr.strip().splitlines()[-1:]}"


def setup_venv(venv: Path) -> None:
    """Create Flower's venv (pinned versions) unless it is there already."""
    if flower_missing(venv) is None:
        return
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)  # before flwr: the CPU wheel
    subprocess.run([*pip, f"flwr[simulation]=={FLWR_VERSION}", "scikit-learn>=1.3"], check=True)


def _child(cmd: list[str], timeout: float) -> tuple[str, float, float]:
    """Run `cmd` from the repo root -> (stdout, peak tree RSS MiB, wall s)."""
    env = {**os.environ, **QUIET_ENV, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with PeakSampler(proc.pid) as mem:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {err[-2000:]}")
    return out, mem.peak, time.perf_counter() - t0


def _summary(round_s: list[float], peak: float, wall: float, loss: float | None,
             acc: float | None, **extra: Any) -> dict[str, Any]:
    later = round_s[1:] or round_s  # Flower starts its Ray actors in round 1
    return {"round_s": round(sum(round_s) / len(round_s), 2), "rounds_s": round_s,
            "round_s_after_first": round(sum(later) / len(later), 2),
            "total_round_s": round(sum(round_s), 2),
            "setup_s": round(wall - sum(round_s), 2), "peak_mb": round(peak, 1),
            "wall_s": round(wall, 2), "final_eval_loss": loss, "final_accuracy": acc, **extra}


def run_ours(*, clients: int, rounds: int, inner_steps: int, engine: str,
             workers: int | None = None, timeout: float = 3600) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.simulate", "--nodes", str(clients), "--rounds",
           str(rounds), "--inner-steps", str(inner_steps), "--aggregator", "mean",
           "--opt-state", "fresh", "--quiet", "--engine", engine]
    if engine == "ray" and workers:
        cmd += ["--workers", str(workers)]
    out, peak, wall = _child(cmd, timeout)
    lines = out.strip().splitlines()
    figures = json.loads(lines[-1])
    header = next(line.split("|") for line in lines if line.startswith("round |"))
    col = [c.strip() for c in header].index("round_s")
    round_s = [float(line.split("|")[col]) for line in lines
               if line.split("|")[0].strip().isdigit()]
    if len(round_s) != rounds:
        raise RuntimeError(f"bench.simulate reported {len(round_s)} of {rounds} rounds")
    return _summary(round_s, peak, wall, figures["final_eval_loss"],
                    figures["final_accuracy"], engine=engine,
                    workers=figures.get("workers", 1))


def run_flower(*, venv: Path, clients: int, rounds: int, inner_steps: int,
               timeout: float = 3600) -> dict[str, Any]:
    cmd = [str(venv_python(venv)), "-m", "bench.flower_side", "--clients", str(clients),
           "--rounds", str(rounds), "--inner-steps", str(inner_steps)]
    out, peak, wall = _child(cmd, timeout)
    f = json.loads(out.strip().splitlines()[-1])
    return _summary(f["round_s"], peak, wall, f["eval_loss"][-1], f["accuracy"][-1],
                    flwr=f["flwr"], ray=f["ray"])


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    rows = [f"{'side':<14} {'round_s':>8} {'per round':<24} {'peak_mb':>8} {'wall_s':>8} "
            f"{'eval_loss':>9} {'accuracy':>8}"]
    for name, r in results.items():
        loss, acc = r["final_eval_loss"], r["final_accuracy"]
        loss_txt = "n/a" if loss is None else f"{loss:.4f}"
        acc_txt = "n/a" if acc is None else f"{acc:.3f}"
        rows.append(f"{name:<14} {r['round_s']:>8.2f} {r['rounds_s']!s:<24} "
                    f"{r['peak_mb']:>8.1f} {r['wall_s']:>8.1f} {loss_txt:>9} {acc_txt:>8}")
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.vs_flower", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--inner-steps", type=int, default=50)
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--setup", action="store_true", help="create Flower's venv if absent")
    p.add_argument("--skip-flower", action="store_true", help="only our side")
    p.add_argument("--engines", default="ray",
                   help="our engines to run, comma-separated (ray, asyncio)")
    p.add_argument("--workers", type=int, default=None, help="our ray workers (default: CPUs)")
    args = p.parse_args(argv)
    args.engines = [e for e in args.engines.split(",") if e]
    if not args.engines or any(e not in ("ray", "asyncio") for e in args.engines):
        p.error("--engines: a comma-separated subset of ray,asyncio")
    if args.clients < 1 or args.rounds < 1 or args.inner_steps < 1:
        p.error("--clients, --rounds and --inner-steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from bench.common import emit

    args = parse(argv)
    results: dict[str, dict[str, Any]] = {}
    if not args.skip_flower:
        if args.setup:
            setup_venv(args.venv)
        why = flower_missing(args.venv)
        if why is not None:
            raise SystemExit(why)
        results["flower"] = run_flower(venv=args.venv, clients=args.clients,
                                       rounds=args.rounds, inner_steps=args.inner_steps)
    for engine in args.engines:
        results["ours" if engine == args.engines[0] else f"ours_{engine}"] = run_ours(
            clients=args.clients, rounds=args.rounds, inner_steps=args.inner_steps,
            engine=engine, workers=args.workers)
    print(f"{args.clients} clients, {args.rounds} rounds, {args.inner_steps} local AdamW steps "
          f"of batch 32 per client and round, same machine (ours: {args.engines[0]} engine)")
    print("\n".join(table(results)))
    figures: dict[str, Any] = {**results, "clients": args.clients, "rounds": args.rounds,
                               "inner_steps": args.inner_steps}
    if "flower" in results:
        ours, fl = results["ours"], results["flower"]
        figures["ratio_round_s"] = round(ours["round_s"] / fl["round_s"], 3)
        figures["ratio_peak"] = round(ours["peak_mb"] / fl["peak_mb"], 3)
    emit(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
