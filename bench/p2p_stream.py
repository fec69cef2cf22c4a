"""A streamed p2p reduction against one frame per shard: owner memory and time.

    python -m bench.p2p_stream [--flavour 20m] [--peers 4] [--chunk-mb 1] [--rounds 1]

N peer processes (bench.p2p_peers: native_node.p2p.P2PRole, ML-DSA-65-signed Shard frames,
aiortc data channels on this machine's interfaces) reduce one float32 tensor each, as large
as the llama flavour's parameter count, twice: with one shard per member (each slice one
frame, the p2p default) and streamed (`stream_chunk_mb`: shards no larger than a chunk,
pieces windowed, acknowledged and dropped once reduced; shared/p2p_stream.py). Per mode:
the peak RSS growth of the worst owner in its first reduction (round 0, in a fresh process:
RSS sampled every 2 ms from the plan to the aggregate, less RSS at the plan; what the
reduction adds, the aggregate it must hold and the channels' opening included; a later round
starts holding the last round's reducer and aggregate and reuses their memory), the
largest Shard frame a peer sent, the round's seconds and MB sent per peer. Round 0 opens the
channels and is not timed. Every peer of a run must end with the same aggregate SHA-256,
and the two modes with the same mean (fp16 results) up to one rounding step (each run draws
new identities, so the members' order, and the summation order, differ).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import numpy as np

from bench.p2p_peers import run_ours
from ml.llama import LLAMA_FLAVOURS, llama_param_count

# glibc: buffers from 64 KiB up always get their own mapping, returned when freed (by default
# the threshold grows with what was freed, and freed buffers then stay resident in the heap,
# so a round's VmRSS would hide the memory an earlier round freed)
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.p2p_stream", description=__doc__)
    p.add_argument("--flavour", default="20m", choices=[f for f in LLAMA_FLAVOURS
                                                        if f != "125m"])
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--chunk-mb", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=1, help="timed rounds per mode")
    p.add_argument("--codec", default="fp16", choices=["fp16", "raw32"])
    p.add_argument("--only", choices=["one-frame", "streamed"],
                   help="run one mode (no comparison figures)")
    args = p.parse_args(argv)
    if args.peers < 2 or args.rounds < 1 or args.chunk_mb <= 0:
        p.error("--peers >= 2, --rounds >= 1, --chunk-mb > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    size = llama_param_count({**LLAMA_FLAVOURS[args.flavour], "vocab_size": 256})
    chunk = int(args.chunk_mb * 2**20) // 4 * 4
    rows: list[dict[str, Any]] = []
    aggs = []
    for mode, stream_chunk in (("one-frame", 0), ("streamed", chunk)):
        if args.only not in (None, mode):
            continue
        res = asyncio.run(run_ours(peers=args.peers, size=size, codec=args.codec,
                                   rounds=args.rounds, stream_chunk=stream_chunk,
                                   env=MALLOC))
        aggs.append(res.pop("aggregate"))
        rows.append({"mode": mode, "chunk_bytes": stream_chunk, **res})
    # the members' order (random identities) changes the mean's rounding: one fp16 step at most
    if len(aggs) == 2 and not np.allclose(aggs[0], aggs[1], rtol=2**-9, atol=2**-20):
        raise RuntimeError("the streamed aggregate differs from the one-frame aggregate")
    print(f"llama {args.flavour}: {size:,} params ({4 * size / 2**20:.1f} MiB float32), "
          f"{args.peers} peers, 2 owners per shard, {args.codec} results, chunk "
          f"{args.chunk_mb} MiB")
    print(f"{'mode':<10} | {'owner RSS growth MB':>19} | {'largest frame B':>15} | "
          f"{'round s':>8} | {'MB sent/peer':>12}")
    for r in rows:
        print(f"{r['mode']:<10} | {r['owner_rss_growth_mb']:>19,.1f} | "
              f"{r['max_shard_frame']:>15,} | {r['round_s']:>8.2f} | {r['MB_per_peer']:>12.2f}")
    print(json.dumps({"bench": "p2p_stream", "flavour": args.flavour, "n_params": size,
                      "peers": args.peers, "chunk_mb": args.chunk_mb, "codec": args.codec,
                      # within a rounding step; None: one mode ran (--only), nothing compared
                      "same_aggregate": True if len(rows) == 2 else None,
                      "owner_rss_growth_mb": {r["mode"]: r["owner_rss_growth_mb"] for r in rows},
                      "max_shard_frame": {r["mode"]: r["max_shard_frame"] for r in rows},
                      "round_s": {r["mode"]: r["round_s"] for r in rows},
                      "MB_per_peer": {r["mode"]: r["MB_per_peer"] for r in rows},
                      "growth_ratio": round(rows[-1]["owner_rss_growth_mb"]
                                            / max(rows[0]["owner_rss_growth_mb"], 0.1), 3)
                      if len(rows) == 2 else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
