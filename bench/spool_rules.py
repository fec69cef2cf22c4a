"""The server's memory while it aggregates a round: every rule, spooled vs single-frame.

    python -m bench.spool_rules                      # 4 and 16 updates of 4M params (16 MB)
    python -m bench.spool_rules --params 100000 --participants 5 --rules krum

For each participant count N, N float32 updates (random, with adversarial rows: a huge one,
a sign-flipped scaled copy, two identical) are written to a spool folder
(server.spool.Spool.store_vector, what the server does with a streamed update). Then, per
rule and mode, a fresh child process measures its own resident set (/proc/self/status):
baseline after imports (peak reset there, clear_refs 5), then

- single: the N updates loaded into memory (what a single-frame Submit leaves at the
  server), then the rule over them (shared.aggregation, as server.reduction calls it);
- streamed: the rule over the spool's memmaps (server.spool_rules.aggregate: reads the
  files by column blocks, never through the mapping).

growth = peak (VmHWM) - baseline: what the round's updates and the rule cost the server.
`held_mb` is the updates' size in memory (N x 4 x params for single, 0 for streamed).
`same` says whether both modes gave the same bytes (SHA-256 of the result). f comes from
`--byzantine-fraction` as the server sets it (estimate_f, clamped to the rule's bound).
"weighted-mean" is stake / step weights (server.spool_rules.weighted_mean).
The machine is shared with other jobs: agg_s is loose, memory figures are not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import emit, print_table

RULES = ["krum", "multi-krum", "bulyan", "geometric-median", "centered-clipping",
         "weighted-mean"]


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(mode: str, rule: str, folder: Path, n: int, fraction: float) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    from server.spool_rules import aggregate, weighted_mean
    from shared.aggregation import estimate_f, get_rule

    meta = json.loads((folder / "meta.json").read_text())
    d = int(meta["params"])
    paths = sorted(folder.glob("*.f32"))[:n]
    baseline = _status_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    t0 = time.perf_counter()
    if mode == "single":
        vectors: list[np.ndarray] = [np.fromfile(p, dtype="<f4").astype(np.float32, copy=False)
                                     for p in paths]
        held = sum(v.nbytes for v in vectors) / 2**20
    else:
        vectors = [np.memmap(p, dtype="<f4", mode="r", shape=(d,)) for p in paths]
        held = 0.0
    t1 = time.perf_counter()
    weights = [float(i % 3 + 1) for i in range(n)]
    f = 0
    if rule == "weighted-mean":
        out = weighted_mean(vectors, weights)
    elif mode == "single":
        f = estimate_f(n, fraction, rule=rule)
        out = np.asarray(get_rule(rule)(vectors, f=f), dtype=np.float32)
    else:
        f = estimate_f(n, fraction, rule=rule)
        out = aggregate(rule, vectors, f=f)
    t2 = time.perf_counter()
    peak = _status_mb("VmHWM")
    return {"rule": rule, "participants": n, "mode": mode, "f": f, "params": d,
            "held_mb": round(held, 1), "baseline_rss_mb": round(baseline, 1),
            "peak_rss_mb": round(peak, 1), "growth_mb": round(peak - baseline, 1),
            "load_s": round(t1 - t0, 3), "agg_s": round(t2 - t1, 3), "peak_reset": reset,
            "digest": hashlib.sha256(out.astype("<f4").tobytes()).hexdigest()[:16]}


def write_round(folder: Path, n: int, d: int, seed: int) -> None:
    from server.spool import Spool

    rng = np.random.default_rng(seed)
    base = rng.standard_normal(d, dtype=np.float32) * np.float32(1e-3)
    spool = Spool(folder)
    for i in range(n):
        if i == 0:
            v = rng.standard_normal(d, dtype=np.float32)  # ~1000x the others
        elif i == 1 and n > 2:
            v = rng.standard_normal(d, dtype=np.float32) * np.float32(-3e-3)
        elif i == 3 and n > 4:
            v = np.fromfile(folder / f"{2:064x}-0.f32", dtype="<f4")  # a copy of update 2
        else:
            v = base + rng.standard_normal(d, dtype=np.float32) * np.float32(1e-4)
        spool.store_vector(f"{i:064x}", 0, v)
        del v
    (folder / "meta.json").write_text(json.dumps({"params": d, "n": n}))


def measure(mode: str, rule: str, folder: Path, n: int, fraction: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bench.spool_rules", "--child", mode, rule,
                           str(folder), str(n), "--byzantine-fraction", str(fraction)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} {rule} n={n}: {proc.stderr[-2000:]}")
    row: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=int, default=4 * 2**20)
    p.add_argument("--participants", default="4,16", help="comma-separated counts")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--byzantine-fraction", type=float, default=0.2)
    p.add_argument("--child", nargs=4, metavar=("MODE", "RULE", "FOLDER", "N"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        mode, rule, folder, n = args.child
        print(json.dumps(child(mode, rule, Path(folder), int(n), args.byzantine_fraction)))
        return 0
    counts = [int(x) for x in args.participants.split(",")]
    rules = [r for r in args.rules.split(",") if r]
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        p.error(f"unknown rules {unknown}; known: {RULES}")
    rows = []
    for n in counts:
        with tempfile.TemporaryDirectory(prefix="bench-spool-rules-") as tmp:
            folder = Path(tmp)
            write_round(folder, n, args.params, seed=n)
            for rule in rules:
                pair = [measure(mode, rule, folder, n, args.byzantine_fraction)
                        for mode in ("single", "streamed")]
                same = pair[0]["digest"] == pair[1]["digest"]
                for row in pair:
                    row["same"] = same
                rows += pair
    print_table(rows, ["rule", "participants", "f", "mode", "held_mb", "baseline_rss_mb",
                       "growth_mb", "agg_s", "same"])
    growth = {f"{r['rule']}_{r['mode']}_{r['participants']}": r["growth_mb"] for r in rows}
    emit({"bench": "spool_rules", "params": args.params,
          "update_mb": round(4 * args.params / 2**20, 2), "participants": counts,
          "byzantine_fraction": args.byzantine_fraction, "growth_mb": growth,
          "all_same": all(r["same"] for r in rows), "rows": rows,
          "note": "2-core machine shared with other jobs: agg_s is loose"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
