"""Regenerate bench/results/p2p_result_codec.txt: does shipping p2p shard results as fp16 /
bf16 instead of raw32 cost model quality?

    python -m scripts.p2p_result_codec [--seeds 5] [--seeds-h50 3] [--no-transport] [--out F]

Part 1: `python -m bench.simulate --nodes 8 --rounds 12 --inner-steps 20 --seed S
--p2p-results CODEC` (mlp-digits, median: the simulator's defaults) for S < --seeds and every
codec. Part 2: the same at the run's default H (50) with 20 rounds, S < --seeds-h50, with the
wall time. Part 3: real p2p runs (`python -m bench.transport --no-chromium --peers --repeats 1
--mb 2 --quality 10 --quality-steps 20`), its output as printed. One line per run:
seed, codec, and the final figures from each command's JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODECS = ("raw32", "fp16", "bf16")
SIM = [sys.executable, "-m", "bench.simulate", "--nodes", "8", "--quiet"]
TRANSPORT = ["--no-chromium", "--peers", "--repeats", "1", "--mb", "2", "--quality", "10",
             "--quality-steps", "20"]


def simulate(args: list[str]) -> dict[str, float]:
    out = subprocess.run([*SIM, *args], cwd=ROOT, capture_output=True, text=True, check=True)
    fig: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return fig


def grid(title: str, seeds: int, flags: list[str], *, wall: bool) -> list[str]:
    lines = [title, "# seed codec final_eval_loss final_accuracy" + (" wall_s" if wall else "")]
    for seed in range(seeds):
        for codec in CODECS:
            f = simulate([*flags, "--seed", str(seed), "--p2p-results", codec])
            row = f"{seed} {codec} {f['final_eval_loss']:.4g} {f['final_accuracy']:.4g}"
            lines.append(row + (f" {f['wall_s']:.2f}" if wall else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.p2p_result_codec", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seeds-h50", type=int, default=3)
    p.add_argument("--no-transport", action="store_true", help="skip part 3")
    p.add_argument("--out", type=Path, default=None, help="write here (default: stdout)")
    args = p.parse_args(argv)
    lines = grid("# python -m bench.simulate --nodes 8 --rounds 12 --inner-steps 20 --seed S "
                 "[--p2p-results CODEC]  (mlp-digits, median)", args.seeds,
                 ["--rounds", "12", "--inner-steps", "20"], wall=False)
    lines += ["", *grid("# python -m bench.simulate --nodes 8 --rounds 20 --seed S "
                        "[--p2p-results CODEC]  (H = 50)", args.seeds_h50, ["--rounds", "20"],
                        wall=True)]
    if not args.no_transport:
        out = subprocess.run([sys.executable, "-m", "bench.transport", *TRANSPORT], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        lines += ["", f"# python -m bench.transport {' '.join(TRANSPORT)}  (real p2p runs, "
                      "4 nodes, gpt-tiny micro)", out.stdout.rstrip("\n")]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
