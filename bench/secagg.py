"""Secure aggregation (shared/secagg) at 16 and 64 peers on a 1,000,000-value update.

    python -m bench.secagg [--dimension 1000000] [--peers 16 64] [--seed 0]

Every participant runs in this process with real ML-KEM-768 (pqcrypto), real ML-DSA-65
signatures and the real SHAKE-128 mask PRG; the aggregator is the same object a server or a
p2p shard owner would run. Measured per peer count:

- round_overhead_s: protocol CPU per participant (process time of keys, Shamir shares,
  sealing, masking, unmask answer; the plain fixed-point update is not counted), mean and max;
- dropouts_tolerated: the largest fraction of the round that drops AFTER sending its masked
  update (it never answers the unmask request) for which the sum still comes out, found by
  trying increasing fractions (random choices of who drops) until the aggregator refuses
  (TooManyDropouts, never a wrong sum);
- sum_exact: every recovered sum equals the plain fixed-point sum, word for word;
- expansion: bytes a participant sends with secure aggregation (all its messages as they
  travel, JSON + raw payload) / 4 * dimension (the same fixed-point vector in the clear),
  the largest over participants, at the largest peer count with a third dropping;
- server_view_uniform_p: Pearson chi-square p-value that the bytes of one masked update are
  uniform (the same test on the update in the clear gives clear_view_uniform_p, ~0). That is
  one draw, uniform on (0, 1) when the view is uniform (so below 0.01 one run in a hundred);
  server_views_ks_p tests all the round's masked updates' p-values together.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from typing import Any

import numpy as np

from shared.envelope import Identity
from shared.secagg import FixedPoint, RoundConfig, TooManyDropouts
from shared.secagg.local import LocalRound
from shared.secagg.stats import chi_square_uniform_p, ks_uniform_p

CLIP = 1.0


def bytes_p(data: bytes) -> float:
    """shared.secagg.stats.byte_uniformity_p with numpy counting (4 MB at a time)."""
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    return chi_square_uniform_p([int(c) for c in counts])


def one_round(n: int, dim: int, seed: int) -> dict[str, Any]:
    ids = [Identity.generate() for _ in range(n)]
    cfg = RoundConfig(run_id="bench-secagg", round=0,
                      seed=hashlib.sha256(f"round seed {seed}".encode()).digest(),
                      dimension=dim, fixed_point=FixedPoint.for_sum(CLIP, n))
    lr = LocalRound(cfg, ids)
    wall0 = time.perf_counter()
    agg = lr.setup()
    assert not lr.errors, lr.errors
    rng = np.random.default_rng(seed)
    plain = np.zeros(dim, dtype=np.uint32)
    uniform_p = clear_p = math.nan
    view_ps = []
    agg_cpu = 0.0
    for i, node in enumerate(lr.live):
        x = (rng.standard_normal(dim) * 0.3).astype(np.float32)
        y = cfg.fixed_point.encode(x)  # the plain update: not protocol overhead
        plain += y
        if i == 0:
            clear_p = bytes_p(y.tobytes())
        with lr.timed(node):
            masked = lr.participants[node].mask(y)
        view_ps.append(bytes_p(masked.payload))
        if i == 0:
            uniform_p = view_ps[0]
        t0 = time.process_time()
        lr.submit(node, masked)
        agg_cpu += time.process_time() - t0
    t0 = time.process_time()
    res = lr.unmask(lr.live)  # everyone answers: the responses every trial draws from
    agg_cpu += time.process_time() - t0
    responses = dict(agg.responses)
    exact = [bool(np.array_equal(res.ring_sum, plain))]

    def trial(dropped: set[str]) -> bool:
        agg.responses = {k: v for k, v in responses.items() if k not in dropped}
        try:
            r = agg.finish()
        except TooManyDropouts as exc:
            trial.refusal = str(exc)  # type: ignore[attr-defined]
            return False
        exact.append(bool(np.array_equal(r.ring_sum, plain)))
        assert set(r.contributors) == set(lr.live)
        return True

    pick = random.Random(seed)
    third = math.ceil(n / 3)
    ladder = sorted({1, max(1, n // 8), max(1, n // 4), n // 3, third, *range(third + 1, n)})
    tolerated, refusal = 0, ""
    for m in ladder:
        if not all(trial(set(pick.sample(lr.live, m))) for _ in range(2)):
            refusal = getattr(trial, "refusal", "")
            break
        tolerated = m
    sizes = {k: lr.sent[k] for k in lr.live}
    clear = 4 * dim
    return {
        "peers": n, "degree": len(next(iter(lr.participants.values())).neighbours),
        "threshold": agg.t, "frac_bits": cfg.fixed_point.frac_bits,
        "round_overhead_s": {"mean": float(np.mean([lr.cpu[k] for k in lr.live])),
                             "max": max(lr.cpu[k] for k in lr.live)},
        "aggregator_cpu_s": agg_cpu,
        "dropouts_tolerated": tolerated / n, "dropouts_tolerated_count": tolerated,
        "refused_beyond": refusal[:160],
        "sum_exact": all(exact), "sums_checked": len(exact),
        "expansion": max(sizes.values()) / clear,
        "bytes_sent_max": max(sizes.values()),
        "bytes_besides_the_vector_max": max(sizes.values()) - clear,
        "server_view_uniform_p": uniform_p, "clear_view_uniform_p": clear_p,
        "view_ps": view_ps,
        "wall_s": time.perf_counter() - wall0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dimension", type=int, default=1_000_000)
    ap.add_argument("--peers", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    print(f"{'peers':>5} {'k':>3} {'t':>3} {'cpu/peer s':>10} {'agg cpu s':>9} "
          f"{'drop ok':>7} {'exact':>5} {'expansion':>9} {'uniform p':>9} {'wall s':>6}")
    for n in args.peers:
        r = one_round(n, args.dimension, args.seed)
        rows.append(r)
        print(f"{n:>5} {r['degree']:>3} {r['threshold']:>3} "
              f"{r['round_overhead_s']['mean']:>10.3f} {r['aggregator_cpu_s']:>9.2f} "
              f"{r['dropouts_tolerated']:>7.3f} {r['sum_exact']!s:>5} {r['expansion']:>9.4f} "
              f"{r['server_view_uniform_p']:>9.3f} {r['wall_s']:>6.1f}", flush=True)
        print(f"      beyond {r['dropouts_tolerated_count']} dropped: {r['refused_beyond']}")
    big = rows[-1]
    out = {
        "kem": "ML-KEM-768", "signatures": "ML-DSA-65", "prg": "SHAKE-128 blocks",
        "peers": args.peers, "dimension": args.dimension,
        "dropouts_tolerated": min(r["dropouts_tolerated"] for r in rows),
        "dropouts_tolerated_by_peers": {str(r["peers"]): r["dropouts_tolerated"] for r in rows},
        "expansion": big["expansion"],
        "round_overhead_s": {str(r["peers"]): round(r["round_overhead_s"]["mean"], 4)
                             for r in rows},
        "round_overhead_max_s": {str(r["peers"]): round(r["round_overhead_s"]["max"], 4)
                                 for r in rows},
        "aggregator_cpu_s": {str(r["peers"]): round(r["aggregator_cpu_s"], 3) for r in rows},
        "degree": {str(r["peers"]): r["degree"] for r in rows},
        "threshold": {str(r["peers"]): r["threshold"] for r in rows},
        "sum_exact": all(r["sum_exact"] for r in rows),
        "sums_checked": sum(r["sums_checked"] for r in rows),
        # the first masked update of the largest round (one draw: U(0,1) if uniform)
        "server_view_uniform_p": big["server_view_uniform_p"],
        # every masked update of every round: how many p < 0.01 (about 1% expected), and a
        # Kolmogorov-Smirnov test that those p-values are themselves uniform
        "server_views": sum(len(r["view_ps"]) for r in rows),
        "server_views_p_below_001": sum(p < 0.01 for r in rows for p in r["view_ps"]),
        "server_views_ks_p": ks_uniform_p([p for r in rows for p in r["view_ps"]]),
        "clear_view_uniform_p": max(r["clear_view_uniform_p"] for r in rows),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    out["targets_met"] = bool(out["dropouts_tolerated"] >= 0.33 and out["expansion"] <= 1.2
                              and out["sum_exact"] and out["server_view_uniform_p"] > 0.01)
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
