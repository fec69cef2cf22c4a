"""Regenerate bench/results/transport_runs.txt: repeated bench.transport pair runs and the
interleaved asyncio / uvloop A/B of aiortc -> aiortc in two processes.

    python -m scripts.transport_runs [--runs 4] [--ab-rows 3] [--ab-each 6] [--out FILE]

Part 1: `--runs` times `python -m bench.transport --peers --repeats 3` (no topology runs),
one line each: the event loop and the medians of 3 in MB/s from its JSON line.
Part 2: `--ab-rows` rows; each row is `--ab-each` 16 MB frames per loop, alternating asyncio
and uvloop (DAA_EVENT_LOOP), each frame in a fresh process pair (bench.transport's
aiortc_processes, SCTP tuning on), MB/s sorted. Inside a private network namespace
(bench.netns, needs root), as bench.transport runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench import netns

ROOT = Path(__file__).resolve().parent.parent
ONE_FRAME = """
import json, sys
from bench.transport import aiortc_processes
from transport import evloop, sctp_tuning
sctp_tuning.install()
rows = evloop.run(aiortc_processes(int(float(sys.argv[1]) * 1e6), 1))
print(json.dumps({"loop": evloop.name(), "MBps": rows[0]["MBps"]}))
"""


def last_json(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def pair_runs(runs: int) -> list[str]:
    lines = ["# four more pair runs right after (python -m bench.transport --peers --repeats 3),"
             " medians of 3:"]
    for _ in range(runs):
        # bench.transport re-enters a namespace of its own only when not inside one already
        fig = last_json([sys.executable, "-m", "bench.transport", "--peers", "--repeats", "3"])
        lines.append(f"{fig['event_loop']} {fig['MBps']}")
    return lines


def ab_rows(rows: int, each: int, mb: float) -> list[str]:
    lines = [f"# interleaved A/B, two processes, {each} x {mb:.0f} MB each, MB/s sorted "
             "(scripts/transport_runs.py: the same aiortc_processes on each loop):"]
    for _ in range(rows):
        got: dict[str, list[float]] = {"asyncio": [], "uvloop": []}
        for _ in range(each):
            for loop in got:
                fig = last_json([sys.executable, "-c", ONE_FRAME, str(mb)],
                                env={"DAA_EVENT_LOOP": loop})
                got[str(fig["loop"])].append(float(str(fig["MBps"])))
        lines.append(f"# asyncio {sorted(got['asyncio'])} | uvloop {sorted(got['uvloop'])}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m scripts.transport_runs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--ab-rows", type=int, default=3)
    p.add_argument("--ab-each", type=int, default=6)
    p.add_argument("--mb", type=float, default=16.0)
    p.add_argument("--out", type=Path, default=None, help="write here (default: stdout)")
    args = p.parse_args(argv)
    if not netns.inside():
        why = netns.available()
        if why is not None:
            print(f"error: needs a private network namespace: {why}", file=sys.stderr)
            return 2
        return netns.rerun_inside("scripts.transport_runs", argv)
    lines = [*pair_runs(args.runs), "", *ab_rows(args.ab_rows, args.ab_each, args.mb)]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
