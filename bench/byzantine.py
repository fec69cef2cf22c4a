"""Byzantine-robustness benchmark: attacks x aggregation rules x attacker fractions.

    python -m bench.byzantine [--jobs 2] [--models mlp-digits,gpt-tiny]
        [--fractions 0.1,0.2,0.3333,0.45] [--rules ...] [--attacks ...] [--seeds 0,1,2]
        [--nodes 10] [--rounds 4] [--inner-steps 10] [--fresh] [--quick] [--no-agg-ms]
        [--agg-only] [--agg-repeats 5] [--agg-n 64] [--agg-d 1000000] [--agg-f 15]

Every cell is a `bench.simulate.simulate` run (the REAL coordinator, honest + attacking nodes
over the in-memory transport), averaged over the seeds, and compared with the clean run of the
same rule and seeds (0 attackers). mlp-digits reports validation accuracy (%), gpt-tiny the
eval loss. The row "default" is `DEFAULT_RULE` plus server-side validation (RunConfig
`validation = True`, when the server has it); the plain-rule rows run without validation.

A cell is "n/a" when theory excludes the rule for n nodes and f = floor(n * fraction)
attackers (trimmed-mean n >= 2f+1, krum / multi-krum n >= 2f+3, bulyan n >= 4f+3) -- the
server would silently clamp f to the rule's maximum -- or when the simulator cannot run the
attack on the model; a footnote gives the reason. Runs are cached (keyed by the full cell
config and a digest of the code it runs, bench.common.code_digest) in
bench/results/byzantine-cache.json so an interrupted bench resumes (--fresh ignores it); the
JSON line lists the cells read from the cache in "from_cache". One progress line per
finished run on stderr, with an ETA.

`agg_ms`: the fastest of --agg-repeats (5) calls (ms) of each rule's numpy path over n = 64
updates of 1,000,000 float32 values (rows of one stacked array, as bench.agg_speed hands
them) with f = 15 (the largest f with n >= 4f+3, so every rule
incl. Bulyan accepts it), on one thread (BLAS/OpenMP pools limited to 1), with the load
average next to it; `--agg-only` times the rules and runs no cell. `python -m bench.agg_speed`
times the same rules side by side with byzfl and Flower.

LAST stdout line: JSON with default_rule, worst_loss_ratio_33, worst_acc_drop_33, agg_ms,
grid {model: {fraction: {rule: {attack: value}}}}, clean {model: {rule: value}}, settings,
from_cache (cells not run now), code_digest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.common import ROOT, code_digest, emit

# Picked by experiment (docs/robustness.md, "Choosing the default"), together with
# server-side validation.
DEFAULT_RULE = "centered-clipping"
DEFAULT_ROW = "default"

MODELS = ("mlp-digits", "gpt-tiny")
FRACTIONS = (0.1, 0.2, 1 / 3, 0.45)
ATTACK_ORDER = ("sign-flip", "scaled", "gaussian", "alie", "ipm", "label-flip")
RULE_ORDER = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan",
              "geometric-median", "centered-clipping")
# n >= a*f + b for the rules whose guarantee (and the coordinator's f clamp) needs it
N_BOUNDS: dict[str, tuple[int, int]] = {"trimmed-mean": (2, 1), "krum": (2, 3),
                                       "multi-krum": (2, 3), "bulyan": (4, 3)}
# per-model run settings: (batch size override or None)
BATCH: dict[str, int | None] = {"mlp-digits": None, "gpt-tiny": 8}
# held-out examples the server's validation scores each candidate on (None: the server's
# default, 512); gpt-tiny scores 128 sequences to keep the default row affordable here
VALIDATION_SAMPLES: dict[str, int | None] = {"mlp-digits": None, "gpt-tiny": 128}
CACHE = ROOT / "bench" / "results" / "byzantine-cache.json"
# what a cell runs (bench.simulate in-process): a change here invalidates the cached cells
MEASURED = ("bench/simulate.py", "bench/sim_nodes.py", "shared", "ml", "server")
CELL_TIMEOUT_S = 900.0
ONE_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
log = logging.getLogger("bench.byzantine")


@dataclasses.dataclass(frozen=True)
class Run:
    """One simulate() run: a (model, fraction, row, attack, seed) cell at fixed settings."""

    model: str
    fraction: float  # 0.0 = the clean run
    row: str  # a RULES name or DEFAULT_ROW
    attack: str  # "none": no attacker (at fraction > 0: the server still assumes it)
    seed: int
    nodes: int
    rounds: int
    inner_steps: int
    batch_size: int | None
    validation: bool  # True only for DEFAULT_ROW when the server supports it
    validation_samples: int | None = None  # RunConfig validation_samples (None: default)
    rule: str = ""  # the aggregation rule run (the row's, or the default's for DEFAULT_ROW)

    def __post_init__(self) -> None:
        if not self.rule:
            object.__setattr__(self, "rule", DEFAULT_RULE if self.row == DEFAULT_ROW
                               else self.row)

    def key(self) -> str:
        """The cache key: the cell's settings and a digest of the code that runs it."""
        return json.dumps({**dataclasses.asdict(self), "code": code_digest(*MEASURED)},
                          sort_keys=True)

    def label(self) -> str:
        return f"{self.model} {frac_label(self.fraction)} {self.row} {self.attack} s{self.seed}"


def frac_label(x: float) -> str:
    return f"{x:.2f}"


def n_attackers(nodes: int, fraction: float) -> int:
    return math.floor(round(nodes * fraction, 9))  # as simulate() and estimate_f count


def server_has_validation() -> bool:
    from server.config import RunConfig
    return "validation" in {f.name for f in dataclasses.fields(RunConfig)}


def excluded(model: str, rule: str, attack: str, nodes: int, fraction: float) -> str | None:
    """Why this cell cannot be run (theory or simulator), or None."""
    f = n_attackers(nodes, fraction)
    if rule in N_BOUNDS:
        a, b = N_BOUNDS[rule]
        if nodes < a * f + b:
            return f"{rule} needs n >= {a}f+{b}; n={nodes}, f={f}"
    return None  # label flipping on gpt-tiny flips next tokens over the vocabulary


def run_one(run: Run) -> dict[str, Any]:
    """Worker: one simulate() run in this process; never raises (errors are data)."""
    import torch

    torch.set_num_threads(1)
    quiet = [logging.getLogger(name) for name in ("server", "bench")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        return _run_one(run)
    finally:  # in-process callers (the tests) keep their logging
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)


def _run_one(run: Run) -> dict[str, Any]:
    from bench.simulate import simulate

    extra: dict[str, Any] = {}
    if run.batch_size is not None:
        extra["batch_size"] = run.batch_size
    if run.validation:
        extra["validation"] = True
        if run.validation_samples is not None:
            extra["validation_samples"] = run.validation_samples
    byz = run.fraction
    if run.attack == "none":  # no attacker; the server's f still follows run.fraction
        byz, extra["byzantine_fraction"] = 0.0, run.fraction
    tmp = Path(tempfile.mkdtemp(prefix="daa-byz-"))
    t0 = time.perf_counter()
    # A fresh loop that is NOT closed with asyncio.run(): when simulate() raises, the
    # coordinator task it started is left behind (asyncio.run() would wait forever on it).
    loop = asyncio.new_event_loop()
    try:
        out = loop.run_until_complete(asyncio.wait_for(simulate(
            nodes=run.nodes, rounds=run.rounds, byzantine=byz,
            attack=run.attack if run.attack != "none" else "sign-flip", aggregator=run.rule,
            model=run.model, seed=run.seed, inner_steps=run.inner_steps, data_dir=tmp,
            progress=False, extra_config=extra), timeout=CELL_TIMEOUT_S))
        s = out["summary"]
        res = {"eval_loss": s["final_eval_loss"], "accuracy": s["final_accuracy"],
               "initial_eval_loss": s["initial_eval_loss"],
               "rejected": sum(s["rejected"].values()), "byzantine": s["byzantine"],
               "wall_s": round(time.perf_counter() - t0, 2)}
    except Exception as exc:  # reported per cell, never silent
        res = {"error": f"{type(exc).__name__}: {exc}"[:300],
               "wall_s": round(time.perf_counter() - t0, 2)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def _pool_run(run: Run) -> tuple[Run, dict[str, Any]]:
    return run, run_one(run)


def _cost(run: Run) -> float:
    """Rough relative cost, so the long runs start first."""
    per_step = 14.0 if run.model == "gpt-tiny" else 0.2
    return per_step * run.nodes * run.rounds * run.inner_steps


def execute(runs: list[Run], *, jobs: int, cache: dict[str, Any],
            save: Callable[[], None]) -> None:
    """Run every run not in `cache` (longest first), storing results in it."""
    todo = sorted((r for r in runs if r.key() not in cache), key=_cost, reverse=True)
    total = len(todo)
    if not total:
        return
    print(f"{total} runs to do ({len(runs) - total} cached), {jobs} job(s)", file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    left_cost = sum(_cost(r) for r in todo)
    done_cost = 0.0

    def results() -> Iterable[tuple[Run, dict[str, Any]]]:
        if jobs <= 1:
            for r in todo:
                yield r, run_one(r)
            return
        ctx = multiprocessing.get_context("forkserver")
        with ctx.Pool(jobs, maxtasksperchild=20) as pool:
            yield from pool.imap_unordered(_pool_run, todo, chunksize=1)

    for k, (run, res) in enumerate(results(), 1):
        cache[run.key()] = res
        save()
        done_cost += _cost(run)
        el = time.perf_counter() - t0
        eta = el / done_cost * (left_cost - done_cost) if done_cost else 0.0
        val = res.get("error") or (f"acc {res['accuracy']:.3f}" if res.get("accuracy")
                                   is not None else f"loss {res.get('eval_loss')}")
        print(f"[{k}/{total}] {run.model} {run.row} {run.attack} "
              f"{frac_label(run.fraction)} seed {run.seed}: {val} ({res['wall_s']} s); "
              f"elapsed {el / 60:.1f} min, ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)


# -- aggregation timing ----------------------------------------------------------------------
def time_rules(rules: Iterable[str], *, n: int = 64, d: int = 1_000_000, f: int = 15,
               repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Fastest of `repeats` calls (ms) of each rule's numpy path over n float32 updates of d
    values, on one thread. The minimum, not the median: the machine is shared, and other
    work only ever adds time."""
    for var in ONE_THREAD_ENV:  # before numpy's first import (threadpoolctl covers the rest)
        os.environ.setdefault(var, "1")
    import numpy as np
    from threadpoolctl import threadpool_limits

    from shared.aggregation import get_rule

    rng = np.random.default_rng(seed)
    # the rows of one (n, d) array: the memory bench.agg_speed hands every side (64 separate
    # 4,000,000-byte arrays miss numpy's huge pages; its --separate times those too)
    stack = list(np.stack([rng.standard_normal(d, dtype=np.float32) * 0.01 for _ in range(n)]))
    out: dict[str, float] = {}
    with threadpool_limits(1):  # one thread, as the peers are measured (bench.agg_speed)
        for name in rules:
            rule = get_rule(name)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                rule(stack, f=f)
                times.append((time.perf_counter() - t) * 1000.0)
            out[name] = round(min(times), 1)
    return out


# -- tables ----------------------------------------------------------------------------------
def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    if len(vals) != len(values) or not vals:
        return None
    m = sum(vals) / len(vals)
    return m if math.isfinite(m) else None


def _value(model: str, res: dict[str, Any]) -> float | None:
    if "error" in res:
        return None
    v = res["accuracy"] * 100.0 if model == "mlp-digits" else res["eval_loss"]
    return float(v) if v is not None and math.isfinite(v) else None


def _fmt(model: str, v: float | None) -> str:
    if v is None:
        return "nan"
    return f"{v:.1f}" if model == "mlp-digits" else f"{v:.3f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def build(args: argparse.Namespace, cache: dict[str, Any], *, validation: bool,
          runs_for: Callable[..., Run]) -> tuple[dict[str, Any], list[str]]:
    """Average the seeds into the grid; returns (figures, printed lines)."""
    lines: list[str] = []
    notes: dict[str, int] = {}
    grid: dict[str, Any] = {}
    clean: dict[str, Any] = {}
    clean_f: dict[str, Any] = {}  # no attacker, but the server assumes the fraction
    errors: list[str] = []

    def note(text: str) -> str:
        notes.setdefault(text, len(notes) + 1)
        return f"n/a[{notes[text]}]"

    def cell(model: str, frac: float, row: str, attack: str) -> tuple[float | None, str]:
        rule = DEFAULT_RULE if row == DEFAULT_ROW else row
        why = excluded(model, rule, attack, args.nodes, frac)
        if why:
            return None, note(why)
        vals = []
        for seed in args.seeds:
            res = cache.get(runs_for(model, frac, row, attack, seed).key())
            if res is None:
                return None, "-"  # not run (see --cached-only)
            if "error" in res:
                errors.append(f"{model} {row} {attack} {frac_label(frac)} seed {seed}: "
                              f"{res['error']}")
            vals.append(_value(model, res))
        m = _mean(vals)
        return m, _fmt(model, m)

    unit = {"mlp-digits": "accuracy %, higher is better",
            "gpt-tiny": "eval loss, lower is better"}
    for model in args.models:
        grid[model], clean[model], clean_f[model] = {}, {}, {}
        cleans = {row: cell(model, 0.0, row, "none") for row in args.rules}
        for row, (v, _) in cleans.items():
            clean[model][row] = v
        for frac in args.fractions_of[model]:
            f = n_attackers(args.nodes, frac)
            lines.append(f"\n### {model}: {frac_label(frac)} attackers ({f} of {args.nodes}); "
                         f"{unit.get(model, '')}, mean of {len(args.seeds)} seed(s)\n")
            header = ["rule", "clean", "clean, f assumed", *args.attacks]
            rows = []
            grid[model][frac_label(frac)] = {}
            clean_f[model][frac_label(frac)] = {}
            for row in args.rules:
                vals = {a: cell(model, frac, row, a) for a in args.attacks}
                same_f = cell(model, frac, row, "none")
                grid[model][frac_label(frac)][row] = {a: v for a, (v, _) in vals.items()}
                clean_f[model][frac_label(frac)][row] = same_f[0]
                name = f"{row} ({DEFAULT_RULE}{' + validation' if validation else ''})" \
                    if row == DEFAULT_ROW else row
                rows.append([name, cleans[row][1], same_f[1],
                             *(t for _, t in vals.values())])
            lines.append(markdown(header, rows))
    if notes:
        lines.append("")
        lines += [f"[{k}] {text}" for text, k in notes.items()]
    if errors:
        lines.append("\nruns that failed (shown as nan):")
        lines += [f"  {e}" for e in errors[:40]]
    return {"grid": grid, "clean": clean, "clean_f_assumed": clean_f,
            "failed_runs": len(errors)}, lines


def summary(args: argparse.Namespace, figs: dict[str, Any]) -> dict[str, Any]:
    """worst_loss_ratio_33 / worst_acc_drop_33 of the default row, ALIE on krum and median."""
    out: dict[str, Any] = {"worst_loss_ratio_33": None, "worst_acc_drop_33": None}
    key33 = frac_label(1 / 3)
    grid, clean = figs["grid"], figs["clean"]

    def worst(model: str, row: str, fn: Callable[[float, float], float]) -> float | None:
        cells = grid.get(model, {}).get(key33, {}).get(row)
        base = clean.get(model, {}).get(row)
        if cells is None or base is None:
            return None
        vals = [fn(v, base) for v in cells.values() if v is not None]
        return round(max(vals), 4) if vals else None

    ratio = lambda v, c: v / c  # noqa: E731
    drop = lambda v, c: c - v  # noqa: E731
    if DEFAULT_ROW in args.rules:
        out["worst_loss_ratio_33"] = worst("gpt-tiny", DEFAULT_ROW, ratio)
        out["worst_acc_drop_33"] = worst("mlp-digits", DEFAULT_ROW, drop)
    out["targets_met"] = {
        "loss_within_5pct": None if out["worst_loss_ratio_33"] is None
        else out["worst_loss_ratio_33"] <= 1.05,
        "acc_within_2pts": None if out["worst_acc_drop_33"] is None
        else out["worst_acc_drop_33"] <= 2.0}
    alie: dict[str, Any] = {}
    for row in ("krum", "median", "trimmed-mean", DEFAULT_ROW):
        for model in args.models:
            v = grid.get(model, {}).get(key33, {}).get(row, {}).get("alie")
            c = clean.get(model, {}).get(row)
            if v is None or c is None:
                continue
            alie.setdefault(row, {})[model] = (
                {"acc_drop_pts": round(c - v, 2)} if model == "mlp-digits"
                else {"loss_ratio": round(v / c, 4)})
    out["alie_33"] = alie
    return out


# -- CLI ---------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if "/" in part:
            a, b = part.split("/")
            out.append(float(a) / float(b))
        else:
            out.append(float(part))
    return out


def _names(text: str, known: Iterable[str], what: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = sorted(set(names) - set(known))
    if bad:
        raise SystemExit(f"unknown {what} {bad}; known: {sorted(known)}")
    return names


def parse(argv: list[str] | None) -> argparse.Namespace:
    from shared.aggregation import RULES
    from shared.attacks import ATTACKS

    p = argparse.ArgumentParser(prog="python -m bench.byzantine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--fractions", default="0.1,0.2,1/3,0.45")
    p.add_argument("--rules", default=",".join([*RULE_ORDER, DEFAULT_ROW]))
    p.add_argument("--attacks", default=",".join(ATTACK_ORDER))
    p.add_argument("--model-fractions", action="append", default=[], metavar="MODEL=F,F",
                   help="per-model attacker fractions, e.g. gpt-tiny=1/3 (repeatable)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--inner-steps", type=int, default=10)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--cache", default=str(CACHE), help="run cache (JSON); '' for none")
    p.add_argument("--fresh", action="store_true", help="ignore (and overwrite) the cache")
    p.add_argument("--quick", action="store_true",
                   help="tiny grid for tests: mlp-digits, 6 nodes, 2 rounds, 2 rules, "
                        "2 attacks, 1/3 attackers, 1 seed, no cache, no agg_ms")
    p.add_argument("--default-rule", default=None,
                   help=f"rule of the '{DEFAULT_ROW}' row (default: DEFAULT_RULE = {DEFAULT_RULE})")
    p.add_argument("--no-agg-ms", action="store_true", help="skip the aggregation timing")
    p.add_argument("--no-clean-f", action="store_true",
                   help="skip the 'clean, f assumed' runs (no attacker, f from the fraction)")
    p.add_argument("--cached-only", action="store_true",
                   help="run nothing; tabulate what the cache holds ('-' = not run)")
    p.add_argument("--agg-n", type=int, default=64)
    p.add_argument("--agg-d", type=int, default=1_000_000)
    p.add_argument("--agg-f", type=int, default=15)
    p.add_argument("--agg-repeats", type=int, default=5,
                   help="timed calls per rule; agg_ms is the fastest")
    p.add_argument("--agg-only", action="store_true",
                   help="time the rules (agg_ms) and run no cell")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.fractions = "mlp-digits", "1/3"
        args.rules, args.attacks, args.seeds = f"mean,{DEFAULT_ROW}", "sign-flip,alie", "0"
        args.nodes, args.rounds, args.inner_steps = 6, 2, 5
        args.jobs, args.cache, args.no_agg_ms = 1, "", True
    args.models = _names(args.models, MODELS, "model")
    args.fractions = _floats(args.fractions)
    per_model: dict[str, list[float]] = {}
    for item in args.model_fractions:
        model, _, fr = item.partition("=")
        per_model[_names(model, MODELS, "model")[0]] = _floats(fr)
    args.fractions_of = {m: per_model.get(m, args.fractions) for m in args.models}
    args.rules = _names(args.rules, [*RULES, DEFAULT_ROW], "rule")
    args.attacks = _names(args.attacks, ATTACKS, "attack")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def plan_runs(args: argparse.Namespace, runs_for: Callable[..., Run]) -> list[Run]:
    """Every (model, row, fraction, attack, seed) cell the arguments ask for."""
    runs: list[Run] = []
    for model in args.models:
        for row in args.rules:
            rule = DEFAULT_RULE if row == DEFAULT_ROW else row
            same_f = [] if args.no_clean_f else ["none"]
            for frac, attacks in [(0.0, ["none"]), *((fr, [*same_f, *args.attacks])
                                                      for fr in args.fractions_of[model])]:
                for attack in attacks:
                    if excluded(model, rule, attack, args.nodes, frac):
                        continue
                    runs += [runs_for(model, frac, row, attack, s) for s in args.seeds]
    return runs


def load_cache(path: Path | None) -> dict[str, Any]:
    """The cells cached at `path` ({} when there is none or it does not parse)."""
    if path is not None and path.exists():
        with contextlib.suppress(ValueError):
            cache: dict[str, Any] = json.loads(path.read_text())
            return cache
    return {}


def save_cache(path: Path | None, cache: dict[str, Any]) -> None:
    """Write `cache` atomically, merged with what a concurrent bench wrote meanwhile."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    cache.update({k: v for k, v in load_cache(path).items() if k not in cache})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, sort_keys=True))
    os.replace(tmp, path)


def agg_setup(args: argparse.Namespace) -> dict[str, Any]:
    return {"n": args.agg_n, "d": args.agg_d, "f": args.agg_f, "repeats": args.agg_repeats,
            "statistic": "min", "threads": 1, "loadavg": loadavg()}


def loadavg() -> str | None:
    """/proc/loadavg's 1/5/15-minute figures (the machine is shared: timings depend on it)."""
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return None


def agg_table(args: argparse.Namespace, agg: dict[str, float]) -> str:
    return (f"\naggregation time, numpy path, n={args.agg_n} x d={args.agg_d} float32, "
            f"f={args.agg_f}, one thread, fastest of {args.agg_repeats} (ms; load "
            f"{loadavg()}):\n" + markdown(list(agg), [[f"{v:.1f}" for v in agg.values()]]))


def agg_only(args: argparse.Namespace) -> int:
    """--agg-only: agg_ms alone (no cell runs, the cache untouched)."""
    from shared.aggregation import RULES

    before = loadavg()
    agg = time_rules(RULES, n=args.agg_n, d=args.agg_d, f=args.agg_f, repeats=args.agg_repeats)
    print(agg_table(args, agg).lstrip())
    emit({"agg_ms": agg, "agg_ms_setup": {**agg_setup(args), "loadavg_before": before}})
    return 0


def main(argv: list[str] | None = None) -> int:
    global DEFAULT_RULE
    args = parse(argv)
    if args.default_rule:
        if args.default_rule not in RULE_ORDER:
            raise SystemExit(f"--default-rule must be one of {RULE_ORDER}")
        DEFAULT_RULE = args.default_rule
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    validation = server_has_validation()
    if not validation and DEFAULT_ROW in args.rules:
        print("WARNING: server.config.RunConfig has no 'validation' key: the default row runs "
              f"{DEFAULT_RULE} WITHOUT validation", file=sys.stderr)

    def runs_for(model: str, frac: float, row: str, attack: str, seed: int) -> Run:
        return Run(model=model, fraction=frac, row=row, attack=attack, seed=seed,
                   nodes=args.nodes, rounds=args.rounds, inner_steps=args.inner_steps,
                   batch_size=BATCH.get(model), validation=validation and row == DEFAULT_ROW,
                   validation_samples=VALIDATION_SAMPLES.get(model)
                   if validation and row == DEFAULT_ROW else None)

    runs = plan_runs(args, runs_for)
    cache_path = Path(args.cache) if args.cache else None
    cache = {} if args.fresh else load_cache(cache_path)

    agg: dict[str, float] | None = None
    if args.agg_only:
        return agg_only(args)
    if not args.no_agg_ms:  # first, so that a --cached-only tabulation sees the newest cache
        from shared.aggregation import RULES
        agg = time_rules(RULES, n=args.agg_n, d=args.agg_d, f=args.agg_f,
                         repeats=args.agg_repeats)
        if args.cached_only and cache_path and cache_path.exists():
            with contextlib.suppress(ValueError):
                cache = json.loads(cache_path.read_text())
    t0 = time.perf_counter()
    from_cache = sorted({r.label() for r in runs if r.key() in cache})
    if not args.cached_only:
        execute(runs, jobs=args.jobs, cache=cache, save=lambda: save_cache(cache_path, cache))
    settings_runs = sum(r.key() in cache for r in runs)
    wall = time.perf_counter() - t0
    figs, lines = build(args, cache, validation=validation, runs_for=runs_for)
    settings = {"nodes": args.nodes, "rounds": args.rounds, "inner_steps": args.inner_steps,
                "seeds": args.seeds, "batch_size": {m: BATCH.get(m) or 32 for m in args.models},
                "fractions": {m: [frac_label(x) for x in fr]
                              for m, fr in args.fractions_of.items()},
                "attackers": {frac_label(x): n_attackers(args.nodes, x)
                              for fr in args.fractions_of.values() for x in fr},
                "validation": validation,
                "validation_samples": {m: VALIDATION_SAMPLES.get(m) or 512 for m in args.models},
                "runs": settings_runs, "runs_not_run": len(runs) - settings_runs,
                "cells_wall_s": round(wall, 1)}
    print(f"Byzantine robustness: {args.nodes} nodes, {args.rounds} rounds x "
          f"{args.inner_steps} inner steps, batch {settings['batch_size']}, seeds {args.seeds}; "
          f"'{DEFAULT_ROW}' = {DEFAULT_RULE}{' + server validation' if validation else ''}; "
          f"{len(runs)} runs, {wall:.0f} s")
    print("\n".join(lines))
    if agg is not None:
        print(agg_table(args, agg))
    figures = {"default_rule": DEFAULT_RULE, "default_validation": validation,
               **summary(args, figs), "agg_ms": agg,
               "agg_ms_setup": None if agg is None else agg_setup(args),
               **figs, "settings": settings,
               "from_cache": from_cache,  # cells not run now: read from --cache
               "code_digest": code_digest(*MEASURED)}
    emit(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
