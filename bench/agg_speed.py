"""Aggregation speed, ours vs the peer libraries (byzfl, Flower), one thread, same run.

    python -m bench.agg_speed [--n 64] [--d 1000000] [--f 15] [--repeats 5] [--rounds 1]
        [--peers-python PATH] [--rules mean,median,...] [--before REV] [--clock cpu] [--separate]

Times every rule of `shared.aggregation` on n float32 updates of d values (standard normal x
0.01, seed 0; f = 15 is the largest f with n >= 4f+3, so Bulyan accepts it), then, back to
back in the same run, the peers' counterparts in a subprocess: byzfl 0.0.11 (numpy input and
torch input, the faster one is its figure) and Flower's `flwr.server.strategy.aggregate`.
Every process runs on ONE thread (OMP/OpenBLAS/MKL = 1, threadpoolctl, torch 1 thread). A
figure is the fastest of `--repeats` calls (a peer call over 5 s is timed once or twice): other
work on a shared machine only adds time; the load average is printed. `--rounds R` repeats the
comparison R times interleaved (ours before, ours, peers) and keeps each figure's fastest.
`--clock cpu` times process CPU time. Ours get a list of 1-D float32 arrays (our API): the rows
of one stacked (n, d) array, the memory the peers read; the peers get their preferred input
built (that array or a tensor; Flower a list of ([update], 1)), stacking not charged.
`--separate` also times ours on n separately allocated arrays ("agg_ms_separate"; 4,000,000
bytes each misses numpy's 4 MiB huge-page threshold: the memory-bound mean reads ~15% slower).

Peers live in a throwaway venv outside the repo (/tmp/peers/venv: a .pth naming this repo's
.venv site-packages, `pip install --no-deps byzfl==0.0.11`, `pip install flwr`); byzfl's
torchvision import is stubbed. `--peers-python ''` skips the peers (their figures are null).

Same answers: "diff" is max |ours - peer| / max |input| per rule. A note says where peers
define a rule differently (byzfl's Krum scores n - f - 1 neighbours, ours and Flower's n - f - 2;
byzfl's geometric median starts from 0 for T iterations: T = the iterations ours took).

LAST stdout line: JSON {"agg_ms": {rule: ours}, "agg_ms_separate": {rule: ms} or null,
"peers_ms": {rule: {byzfl, flwr, byzfl_input (the faster)}}, "best_peer_ms", "ratio_vs_best_peer",
"at_or_below_best", "all_at_or_below_best", "diff": {rule: {peer: rel}}, "setup": {...}}.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported, here and in the peer subprocess

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RULES = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan",
         "geometric-median", "centered-clipping")
DEFAULT_PEERS_PYTHON = "/tmp/peers/venv/bin/python"
TAU = 10.0  # centered clipping's tau (our default), passed to byzfl too
SLOW_S = 5.0  # a peer call slower than this is not repeated more than twice
CLOCK_ENV = "AGG_SPEED_CLOCK"  # "cpu": process CPU time (set by --clock, inherited by workers)


def make_stack(n: int, d: int, seed: int) -> list[Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.standard_normal(d, dtype=np.float32) * np.float32(0.01) for _ in range(n)]


def stacked_rows(stack: list[Any]) -> list[Any]:
    import numpy as np  # the rows of one (n, d) array holding `stack`: what the peers read
    return list(np.stack(stack))


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """(fastest ms over the calls, the last result)."""
    times: list[float] = []
    out = None
    for _ in range(repeats):
        clock = time.process_time if os.environ.get(CLOCK_ENV) == "cpu" else time.perf_counter
        t = clock()
        out = fn()
        times.append((clock() - t) * 1000.0)
        if times[-1] > SLOW_S * 1000.0 and len(times) >= (1 if times[-1] > 4 * SLOW_S * 1000
                                                            else 2):
            break
    return round(min(times), 1), out


def loadavg() -> str:
    """The 1/5/15-minute load averages (the machine is shared: timings depend on them)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def fastest(acc: dict[str, float], new: dict[str, float]) -> dict[str, float]:
    return {k: min(v, acc.get(k, v)) for k, v in new.items()}  # per rule, the lower figure


def one_thread() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


# -- ours ----------------------------------------------------------------------------------------
def run_ours(stack: list[Any], rules: list[str], f: int, repeats: int
             ) -> tuple[dict[str, float], dict[str, Any], int]:
    from shared.aggregation import geometric_median_info, get_rule

    ms: dict[str, float] = {}
    outs: dict[str, Any] = {}
    gm_iters = geometric_median_info(stack, f=f).iterations
    for name in rules:
        rule = get_rule(name)
        kw: dict[str, Any] = {"tau": TAU} if name == "centered-clipping" else {}
        def call(rule: Callable[..., Any] = rule, kw: dict[str, Any] = kw) -> Any:
            return rule(stack, f=f, **kw)
        ms[name], outs[name] = timed(call, repeats)
    return ms, outs, gm_iters


# -- peers (run inside the peers' interpreter) ---------------------------------------------------
def _byzfl_rules(f: int, gm_iters: int) -> dict[str, Callable[[], Any]]:
    if "torchvision" not in sys.modules:  # byzfl imports it for its datasets only
        class Stub(types.ModuleType):
            def __getattr__(self, name: str) -> Any:
                if name.startswith("__"):
                    raise AttributeError(name)
                return lambda *a, **k: None

        tv = Stub("torchvision")
        for sub in ("datasets", "transforms"):
            setattr(tv, sub, Stub(f"torchvision.{sub}"))
            sys.modules[f"torchvision.{sub}"] = getattr(tv, sub)
        sys.modules["torchvision"] = tv
    if "byzfl" not in sys.modules:  # its __init__ pulls in the benchmark (seaborn, datasets)
        import importlib.util

        spec = importlib.util.find_spec("byzfl")
        assert spec is not None
        assert spec.submodule_search_locations is not None
        pkg = types.ModuleType("byzfl")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["byzfl"] = pkg
    from byzfl.aggregators import aggregators as A

    def cc() -> Any:
        return A.CenteredClipping(L=1, tau=TAU)  # .m set per call (its constructor refuses m)

    return {"mean": A.Average, "median": A.Median, "trimmed-mean": lambda: A.TrMean(f=f),
            "krum": lambda: A.Krum(f=f), "multi-krum": lambda: A.MultiKrum(f=f),
            "geometric-median": lambda: A.GeometricMedian(nu=1e-6, T=gm_iters),
            "centered-clipping": cc}


def _flwr_rules(n: int, f: int) -> dict[str, Callable[[list[Any]], Any]]:
    from flwr.server.strategy import aggregate as F

    return {
        "mean": lambda res: F.aggregate(res)[0],
        "median": lambda res: F.aggregate_median(res)[0],
        "trimmed-mean": lambda res: F.aggregate_trimmed_avg(res, f / n)[0],
        "krum": lambda res: F.aggregate_krum(res, num_malicious=f, to_keep=0)[0],
        "multi-krum": lambda res: F.aggregate_krum(res, num_malicious=f, to_keep=n - f)[0],
        "bulyan": lambda res: F.aggregate_bulyan(list(res), f, F.aggregate_krum,
                                                 to_keep=0)[0],
    }


def _time_byzfl(name: str, make: Callable[[], Any], inputs: dict[str, Any],
                repeats: int) -> tuple[float, Any, str]:
    """(ms, output, input kind) of byzfl's rule on the faster of its inputs (numpy array,
    torch tensor)."""
    best: tuple[float, Any, str] | None = None
    for kind, inp in inputs.items():
        def call(inp: Any = inp) -> Any:
            agg = make()
            if name == "centered-clipping":
                agg.m = inp[0] * 0
            return agg(inp)
        t, out = timed(call, repeats)
        if best is None or t < best[0]:
            best = (t, out, kind)
    assert best is not None
    return best


def peer_worker(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    one_thread()
    torch.set_num_threads(1)
    stack = make_stack(args.n, args.d, args.seed)
    X = np.stack(stack)
    T = torch.from_numpy(X)
    results = [([u], 1) for u in stack]
    ms: dict[str, dict[str, float | str | None]] = {}
    outs: dict[str, Any] = {}
    byz = _byzfl_rules(args.f, args.gm_iters)
    flw = _flwr_rules(args.n, args.f)
    for name in args.rules.split(","):
        ms[name] = {"byzfl": None, "flwr": None}
        if name in byz:
            ms[name]["byzfl"], out, kind = _time_byzfl(name, byz[name],
                                                       {"numpy": X, "torch": T}, args.repeats)
            ms[name]["byzfl_input"] = kind
            outs[f"{name}|byzfl"] = out.numpy() if isinstance(out, torch.Tensor) else out
        if name in flw:
            def call(fn: Callable[[list[Any]], Any] = flw[name]) -> Any:
                return fn(results)
            t, out = timed(call, args.repeats)
            ms[name]["flwr"] = t
            outs[f"{name}|flwr"] = np.asarray(out)
    arrays: dict[str, Any] = {k: np.asarray(v, dtype=np.float32) for k, v in outs.items()}
    np.savez(args.out, **arrays)
    print(json.dumps(ms), flush=True)
    return 0


def ours_worker(args: argparse.Namespace) -> int:
    """Time the rules of whatever `shared` this interpreter imports (the --before checkout)."""
    one_thread()
    stack = stacked_rows(make_stack(args.n, args.d, args.seed))
    ms = run_ours(stack, args.rules.split(","), args.f, args.repeats)[0]
    print(json.dumps(ms), flush=True)
    return 0


def run_before(rev: str, args: argparse.Namespace) -> tuple[dict[str, float], str | None]:
    """Our rules as of git revision `rev` (its shared/ only), timed in a subprocess."""
    with tempfile.TemporaryDirectory(prefix="agg-before-") as tmp:
        archive = subprocess.run(["git", "archive", rev, "shared"], cwd=ROOT,
                                 capture_output=True, check=False)
        if archive.returncode != 0:
            return {}, f"git archive {rev}: {archive.stderr.decode()[-300:]}"
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        cmd = [sys.executable, "-m", "bench.agg_speed", "--worker-ours", "--n", str(args.n),
               "--d", str(args.d), "--f", str(args.f), "--repeats", str(args.repeats),
               "--seed", str(args.seed), "--rules", ",".join(args.rules)]
        # cwd first on sys.path: `shared` is the old one, `bench` comes from PYTHONPATH
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode != 0:
            return {}, f"before run failed: {proc.stderr[-800:]}"
        ms: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return ms, None


def run_peers(python: str, args: argparse.Namespace, gm_iters: int
              ) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    import numpy as np

    if not python or not Path(python).exists():
        return {}, {}, f"no peers interpreter at {python!r}"
    with tempfile.TemporaryDirectory(prefix="agg-peers-") as tmp:
        out = Path(tmp) / "out.npz"
        cmd = [python, "-m", "bench.agg_speed", "--worker", "--n", str(args.n), "--d",
               str(args.d), "--f", str(args.f), "--repeats", str(args.repeats), "--seed",
               str(args.seed), "--gm-iters", str(gm_iters), "--rules", ",".join(args.rules),
               "--out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                              env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
        if proc.returncode != 0:
            return {}, {}, f"peers failed: {proc.stderr[-800:]}"
        ms: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        with np.load(out) as z:
            outs = {k: z[k] for k in z.files}
    return ms, outs, None


def rel_diff(a: Any, b: Any, scale: float) -> float | None:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        return None
    return float(f"{float(np.max(np.abs(a - b))) / scale:.3g}")


def table(rules: list[str], ours: dict[str, float], peers: dict[str, Any],
          diff: dict[str, Any], before: dict[str, float]) -> str:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:,.1f}"

    head = ("| rule | ours before ms | ours ms | byzfl ms | flwr ms | best peer | ours / best "
            "| diff byzfl | diff flwr |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rules:
        p = peers.get(r, {})
        vals = [v for v in (p.get("byzfl"), p.get("flwr")) if v is not None]
        best = min(vals) if vals else None
        ratio = "-" if not best else f"{ours[r] / best:.2f}"
        d = diff.get(r, {})
        byz = fmt(p.get("byzfl")) + (f" ({p['byzfl_input']})" if p.get("byzfl_input") else "")
        lines.append(f"| {r} | {fmt(before.get(r))} | {fmt(ours[r])} | {byz} "
                     f"| {fmt(p.get('flwr'))} | {fmt(best)} | {ratio} | {d.get('byzfl', '-')} "
                     f"| {d.get('flwr', '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.agg_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--d", type=int, default=1_000_000)
    p.add_argument("--f", type=int, default=15)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: time each call in process CPU time (less disturbed by a loaded "
                        "machine's time slicing; still by its cache and memory contention)")
    p.add_argument("--rounds", type=int, default=1,
                   help="interleaved rounds of before/ours/peers; each figure is the fastest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--peers-python", default=os.environ.get("AGG_PEERS_PYTHON",
                                                            DEFAULT_PEERS_PYTHON))
    p.add_argument("--before", default="", metavar="REV",
                   help="also time our rules as of git revision REV (same run, first)")
    p.add_argument("--separate", action="store_true", help="also time ours on separate arrays")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-ours", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gm-iters", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return peer_worker(args)
    if args.worker_ours:
        return ours_worker(args)
    from bench.common import emit

    args.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    os.environ[CLOCK_ENV] = args.clock  # the before and peer workers inherit it
    one_thread()
    before: dict[str, float] = {}
    ours: dict[str, float] = {}
    separate: dict[str, float] = {}  # --separate: ours on n separately allocated arrays
    peers: dict[str, Any] = {}
    before_error = why = None
    for _ in range(args.rounds):  # before, ours, peers, again: each sees the same loads
        if args.before:
            ms, before_error = run_before(args.before, args)
            before = fastest(before, ms)
        stack = make_stack(args.n, args.d, args.seed)
        if args.separate:
            separate = fastest(separate, run_ours(stack, args.rules, args.f, args.repeats)[0])
        stack = stacked_rows(stack)
        ms, our_outs, gm_iters = run_ours(stack, args.rules, args.f, args.repeats)
        ours = fastest(ours, ms)
        scale = max(float(abs(u).max()) for u in stack)
        del stack
        p_ms, peer_outs, why = run_peers(args.peers_python, args, gm_iters)
        for rule, row in p_ms.items():
            old = peers.setdefault(rule, dict(row))
            for peer in ("byzfl", "flwr"):
                if row.get(peer) is not None and (old.get(peer) is None
                                                   or row[peer] < old[peer]):
                    old[peer] = row[peer]
                    if peer == "byzfl":
                        old["byzfl_input"] = row.get("byzfl_input")
    diff: dict[str, dict[str, float | None]] = {}
    for key, out in peer_outs.items():
        rule, peer = key.split("|")
        diff.setdefault(rule, {})[peer] = rel_diff(our_outs[rule], out, scale)
    best = {r: min([v for k, v in peers.get(r, {}).items() if k in ("byzfl", "flwr")
                    and v is not None], default=None) for r in args.rules}
    print(f"aggregation time, n={args.n} x d={args.d:,} float32, f={args.f}, one thread, "
          f"fastest of {args.repeats} calls x {args.rounds} round(s) ({args.clock} ms; load "
          "at the end "
          f"{loadavg()}); each round times ours before ({args.before or 'not asked'}), ours "
          "and the peers, back to back"
          + "".join(f"; {e}" for e in (why, before_error) if e))
    print(table(args.rules, ours, peers, diff, before))
    if separate:
        print("ours on separate arrays (--separate), ms: "
              + ", ".join(f"{r} {separate[r]:,.1f}" for r in args.rules))
    print("diff: max |ours - peer| / max |input|. byzfl's Krum family scores n-f-1 neighbours "
          f"(ours, Flower's: n-f-2); byzfl's geometric median starts at 0 with T={gm_iters} "
          "(the iterations ours took from the coordinate-wise median).")
    ratio: dict[str, float | None] = {}
    ok: dict[str, bool | None] = {}
    for r in args.rules:
        b = best[r]
        ratio[r] = None if not b else round(ours[r] / b, 3)
        ok[r] = None if b is None else ours[r] <= b
    emit({"agg_ms": ours, "peers_ms": peers, "best_peer_ms": best, "ratio_vs_best_peer": ratio,
          "at_or_below_best": ok,
          "all_at_or_below_best": None if why else all(v for v in ok.values() if v is not None),
          "diff": diff, "peers_error": why, "agg_ms_separate": separate or None,
          "before_ms": before or None,
          "before_rev": args.before or None, "before_error": before_error,
          "setup": {"n": args.n, "d": args.d, "f": args.f, "repeats": args.repeats,
                    "seed": args.seed, "threads": 1, "tau": TAU, "gm_iterations": gm_iters,
                    "cpu_count": os.cpu_count(), "statistic": "min", "rounds": args.rounds,
                    "clock": args.clock, "ours_input": "rows of one (n, d) array",
                    "loadavg": loadavg()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
