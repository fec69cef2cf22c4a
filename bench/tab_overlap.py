"""Overlapped rounds in a tab (run option `overlap`, browser/node/ahead.js): how much of its
time a tab's trainer computes, with and without.

    python -m bench.tab_overlap                       # gpt-tiny, H=16, 6 rounds, SparseLoCo
    python -m bench.tab_overlap --rounds 2 --inner-steps 2 --outer nesterov   # tiny

For each mode (overlap off, on) a real server (`python -m server`, quorum 1) and one Chromium
tab (`/?backend=wasm`) that trains every round. Without overlap the tab's trainer idles from
its Submit of round t until the RoundOpen of round t+1: the tab's encode and signature, the
upload, the server's aggregation, outer step, evaluation and commit, the downlink and the
tab's own resolve. With it the train worker trains round t+1's steps meanwhile, from where
round t ended, and merges them when the round opens.

Utilization = the tab's compute (the train steps' wall time in its worker, summed over the
updates it sent: steps run ahead included, those after the last round not) over its training
wall time (its first round's start to its last update). round_s is the server's mean round
duration over rounds 1.. (round 0 waits for the tab to load). The machine is shared with
other jobs: every figure is loose. LAST stdout line: JSON (bench.common.emit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import emit, get_json, print_table
from bench.live import running_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SPARSELOCO = ["--outer", "sparseloco", "--outer-lr", "1.0",
              "--outer-params", json.dumps({"fraction": 0.04}), "--codec", "topk",
              "--codec-params", json.dumps({"fraction": 0.04, "values": "int2"})]


def run_mode(browser: Any, work: Path, overlap: bool, args: argparse.Namespace) -> dict[str, Any]:
    flags = ["--model", args.model, "--rounds", str(args.rounds), "--quorum", "1",
             "--inner-steps", str(args.inner_steps), "--batch-size", str(args.batch_size),
             "--deadline-s", "600", "--log-level", "WARNING",
             "--overlap" if overlap else "--no-overlap",
             *(SPARSELOCO if args.outer == "sparseloco" else [])]
    work.mkdir(parents=True)
    with running_server(work, *flags) as (base, _proc):
        ctx = browser.new_context()
        try:
            page = ctx.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{base}/?backend=wasm")
            page.wait_for_function(
                "() => { const s = window.daaNode && window.daaNode.stats; "
                "if (s && s.state === 'stopped') throw new Error(s.errors.join('; ')); "
                "return !!s && s.state === 'the run is finished'; }",
                timeout=args.timeout_s * 1000, polling=500)
            s = page.evaluate("() => window.daaNode.stats")
        finally:
            ctx.close()
        rounds = get_json(base + "/api/rounds?limit=1000")
    later = [float(r["duration_s"]) for r in rounds if r["round"] >= 1]
    return {"overlap": "on" if overlap else "off", "rounds": len(rounds),
            "accepted": s["accepted"], "compute_s": round(s["computeS"], 2),
            "wall_s": round(s["trainWallS"], 2),
            "utilization": round(s["computeS"] / s["trainWallS"], 4),
            "round_s": round(statistics.mean(later), 3) if later else None,
            "steps_ahead": s.get("stepsAhead") or 0, "merged_rounds": s.get("aheadMerges") or 0,
            "sparse_opens": (s.get("downlink") or {}).get("sparse", 0),
            "resyncs": (s.get("downlink") or {}).get("resyncs", 0),
            "final_eval_loss": rounds[-1]["eval_loss"] if rounds else None,
            "console_errors": errors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tab_overlap", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt-tiny")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--inner-steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--outer", default="sparseloco", choices=["nesterov", "sparseloco"])
    ap.add_argument("--timeout-s", type=float, default=480.0)
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    rows = []
    with tempfile.TemporaryDirectory(prefix="tab-overlap-") as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            for overlap in (False, True):
                rows.append(run_mode(browser, Path(tmp) / str(overlap), overlap, args))
        finally:
            browser.close()
    print(f"{args.model}, outer {args.outer}, H={args.inner_steps}, batch {args.batch_size}, "
          f"{args.rounds} rounds, one tab (Chromium, wasm), quorum 1; shared machine, loose")
    print_table(rows, ["overlap", "rounds", "accepted", "compute_s", "wall_s", "utilization",
                       "round_s", "steps_ahead", "merged_rounds", "sparse_opens", "resyncs",
                       "final_eval_loss"])
    off, on = rows
    emit({"bench": "tab_overlap", "model": args.model, "outer": args.outer,
          "inner_steps": args.inner_steps, "rounds": args.rounds,
          "utilization_off": off["utilization"], "utilization_on": on["utilization"],
          "round_s_off": off["round_s"], "round_s_on": on["round_s"],
          "merged_rounds_on": on["merged_rounds"], "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
