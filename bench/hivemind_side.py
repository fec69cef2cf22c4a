"""hivemind's side of bench.vs_hivemind. Runs INSIDE hivemind's own venv (hivemind 1.1.12,
numpy < 2.4, torch; see bench.vs_hivemind), from the repository root, never in the project's:

    VENV/bin/python -m bench.hivemind_side --peers 16 --size 1000000 --compression none

N hivemind.DecentralizedAverager peers on loopback (each its own DHT node, libp2p daemon and
averager process, started by hivemind), one float32 tensor each (the same tensors as ours:
bench.p2p_peers.tensor), target and minimum group size N. Each round every peer calls
step(require_trigger=True); once all have formed their group (stage AWAITING_TRIGGER) the
clock starts, all are triggered, and it stops when every peer's all-reduce returned: the
all-reduce alone, as ours is timed from the plan. Round 0 is not timed. Bytes: every tensor
part hivemind serializes to send (its compression's `compress`), summed over the
peers' averager processes through a shared counter; errors: the worst peer's max absolute
difference from the exact (float64) mean and relative L2 error (8-bit clamps values beyond
3 standard deviations, so its max error is large where its L2 error is small). A round that
returns without averaging (hivemind 1.1.12's 8-bit quantization under numpy >= 2.4) shows as
a large error.

Prints, LAST, JSON: peers, compression, round_s (median of the timed rounds), rounds_s,
match_s, MB_per_peer (sent, per round), max_abs_err, rel_err, versions.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from typing import Any

import numpy as np

from bench.p2p_peers import tensor


def _count_serialized(counter: Any) -> None:
    """Count the bytes of every tensor part the averagers serialize to send (they fork from
    here): each goes through its compression's `compress` (no compression included)."""
    from hivemind.compression import NoCompression
    from hivemind.compression.quantization import Quantization

    for cls in (NoCompression, Quantization):
        orig = cls.compress

        def counting(self: Any, *args: Any, _orig: Any = orig, **kw: Any) -> Any:
            out = _orig(self, *args, **kw)
            with counter.get_lock():
                counter.value += out.ByteSize()
            return out

        cls.compress = counting


def run(peers: int, size: int, compression: str, rounds: int, seed: int) -> dict[str, Any]:
    import hivemind
    import torch
    from hivemind.averaging.control import AveragingStage
    from hivemind.compression import NoCompression, Uniform8BitQuantization

    counter = mp.Value("d", 0.0)
    _count_serialized(counter)
    mine = [tensor(seed, i, size) for i in range(peers)]
    exact = np.mean([t.astype(np.float64) for t in mine], axis=0)
    comp = {"none": NoCompression(), "8bit": Uniform8BitQuantization()}[compression]
    loop = ["/ip4/127.0.0.1/tcp/0"]
    first = hivemind.DHT(start=True, host_maddrs=loop)
    dhts = [first] + [hivemind.DHT(start=True, host_maddrs=loop,
                                   initial_peers=first.get_visible_maddrs())
                      for _ in range(peers - 1)]
    avgs = [hivemind.averaging.DecentralizedAverager(
        [torch.from_numpy(t.copy())], dht=d, prefix="vs_ours", target_group_size=peers,
        min_group_size=peers, min_matchmaking_time=2.0, request_timeout=1.5,
        compression=comp, start=True) for t, d in zip(mine, dhts, strict=True)]
    out: dict[str, Any] = {"peers": peers, "compression": compression, "rounds_s": [],
                           "match_s": [], "MB_per_peer": [], "max_abs_err": [], "rel_err": []}
    try:
        for r in range(rounds + 1):
            for a, t in zip(avgs, mine, strict=True):
                with a.get_tensors() as ts:
                    ts[0].copy_(torch.from_numpy(t))
            t0 = time.perf_counter()
            controls = [a.step(wait=False, require_trigger=True, timeout=300) for a in avgs]
            while not all(c.stage == AveragingStage.AWAITING_TRIGGER or c.done()
                          for c in controls):
                time.sleep(0.002)
            t1, b0 = time.perf_counter(), counter.value
            for c in controls:
                c.allow_allreduce()
            results = [c.result(timeout=300) for c in controls]
            took = time.perf_counter() - t1
            if any(res is None for res in results):
                raise RuntimeError(f"round {r}: a peer's all-reduce failed")
            err = rel = 0.0
            for a in avgs:
                with a.get_tensors() as ts:
                    diff = ts[0].numpy().astype(np.float64) - exact
                err = max(err, float(np.abs(diff).max()))
                rel = max(rel, float(np.linalg.norm(diff) / np.linalg.norm(exact)))
            if r > 0:
                out["rounds_s"].append(round(took, 4))
                out["match_s"].append(round(t1 - t0, 3))
                out["MB_per_peer"].append((counter.value - b0) / peers / 1e6)
                out["max_abs_err"].append(err)
                out["rel_err"].append(rel)
    finally:
        for a in avgs:
            a.shutdown()
        for d in dhts:
            d.shutdown()
    return {**out, "round_s": round(float(np.median(out["rounds_s"])), 4),
            "MB_per_peer": round(float(np.mean(out["MB_per_peer"])), 3),
            "max_abs_err": max(out["max_abs_err"]), "rel_err": max(out["rel_err"]),
            "hivemind": hivemind.__version__,
            "numpy": np.__version__, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hivemind_side", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--compression", default="none", choices=["none", "8bit"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(run(args.peers, args.size, args.compression, args.rounds, args.seed),
                     sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
