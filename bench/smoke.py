"""Smoke benchmark: the real server and 2 native nodes train gpt-tiny for a few rounds on CPU.

    python -m bench.smoke [--nodes 2] [--rounds 5] [--inner-steps 50]

Prints one row per committed round and, as its LAST line, JSON with rounds, eval_loss_start,
eval_loss_end, entropy_floor, bytes_up, bytes_down (counted by the server at the transport,
framing included, all nodes together) and wall_s (server start to last commit).
"""

from __future__ import annotations

import argparse
import math

from bench.common import emit, print_table, run_swarm
from bench.scratch import scratch
from ml.tokenizer import bits_per_byte


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.smoke", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--inner-steps", type=int, default=50)
    p.add_argument("--model", default="gpt-tiny")
    p.add_argument("--flavour", default=None, help="zoo flavour (default: the model's)")
    p.add_argument("--tokenizer", default=None,
                   help="'' (the data's symbols), byte, or bpe:N (ml/tokenizer.py)")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    tmp = scratch("daa-smoke-")
    out = run_swarm(tmp, nodes=args.nodes, rounds=args.rounds, timeout=args.timeout,
                    server_flags=["--model", args.model, "--inner-steps", str(args.inner_steps),
                                  *(["--flavour", args.flavour] if args.flavour else []),
                                  *(["--tokenizer", args.tokenizer] if args.tokenizer else [])])
    run, rounds, wall = out["run"], out["rounds"], out["wall_s"]
    print(f"{args.model} {args.flavour or ''} smoke: {args.nodes} native nodes, "
          f"{args.inner_steps} inner steps/round, "
          f"{run['n_params']:,} params, logs in {tmp}")
    print_table(rounds, ["round", "n_updates", "eval_loss", "train_loss", "bytes_up",
                         "bytes_down", "duration_s"])
    start, end = run["eval_loss_init"], rounds[-1]["eval_loss"]
    floor, bpt = run["entropy_floor"], run.get("bytes_per_token")
    bpb = [bits_per_byte(x, bpt) for x in (start, end)]
    if bpb[0] is not None and bpb[1] is not None:
        rate = run.get("entropy_rate")
        rate_txt = f"; entropy rate {rate / math.log(2):.4f} bits per symbol" if rate else ""
        print(f"bits per byte {bpb[0]:.4f} -> {bpb[1]:.4f} ({bpt:.3f} bytes per token"
              f"{rate_txt})")
    print(f"eval loss {start:.4f} -> {end:.4f} (entropy floor "
          f"{'n/a' if floor is None else format(floor, '.4f')}); "
          f"end/start = {end / start:.3f} (target < 0.9); wall {wall:.1f} s (target < 90 s)")
    emit({"rounds": len(rounds), "nodes": args.nodes, "eval_loss_start": start,
          "eval_loss_end": end, "entropy_floor": floor, "bytes_per_token": bpt,
          "bpb_start": bpb[0], "bpb_end": bpb[1], "tokenizer": args.tokenizer or "",
          "bytes_up": run["bytes_up"], "bytes_down": run["bytes_down"], "wall_s": round(wall, 2),
          "model": args.model, "flavour": args.flavour, "n_params": run["n_params"],
          "passed": bool(end < 0.9 * start and wall < 90)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
