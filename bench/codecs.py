"""Codec benchmark: compression ratio, error and speed of every update codec.

    python -m bench.codecs [--n 10000000] [--pure-n 200000] [--source t3|gpt-tiny]

Input: a 10M-value float32 pseudo-gradient. `gpt-tiny` (default): a REAL pseudo-gradient
(theta_0 - theta after 50 inner AdamW steps of gpt-tiny on the Markov data, torch on CPU,
~10 s), tiled to --n. `t3`: Student-t with 3 degrees of freedom times 1e-3, seeded (heavy
tails: the hard case for block quantizers).

Per codec: ratio = raw float32 bytes / payload bytes, rel_err = ||decode(encode(x)) - x|| /
||x||, encode/decode MB/s (of float32 input, best of 3) on the numpy path over all n values
and on the pure-Python path over the first --pure-n values (PowerSGD: decode only; its
encoder needs numpy). PowerSGD's layout cuts the vector into 1000 x 1000 matrices plus a
1-D remainder (the pure-Python slice: one 1000 x pure_n/1000 matrix); it encodes with a
fresh seeded Q (no warm start). The LAST line is JSON:

    {"codecs": {"<label>": {"ratio", "rel_err", "encode_MBps", "decode_MBps",
                            "encode_MBps_pure", "decode_MBps_pure"}, ...}}
"""

from __future__ import annotations

import argparse
import time
from array import array
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.common import emit, print_table
from shared.codecs import Codec, make_codec
from shared.codecs.powersgd import layout_of

CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("raw32", "raw32", {}),
    ("fp16", "fp16", {}),
    ("bf16", "bf16", {}),
    ("int8-block absmax", "int8-block", {}),
    ("int8-block minmax", "int8-block", {"mode": "minmax"}),
    ("int4-block", "int4-block", {}),
    ("topk 1% int8", "topk", {"fraction": 0.01}),
    ("topk 1% fp16", "topk", {"fraction": 0.01, "values": "fp16"}),
    ("powersgd rank 4", "powersgd", {"rank": 4}),
]


def t3_gradient(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_t(3, n) * 1e-3).astype(np.float32)


def gpt_tiny_gradient(n: int) -> np.ndarray:
    """A real pseudo-gradient of gpt-tiny (50 AdamW steps), tiled to n values."""
    from ml.workload import initial_params, resolve
    from native_node.trainer import Trainer

    work = resolve(model="gpt-tiny", flavour=None, data=None, data_path=None,
                   partition="iid", alpha=0.5, seed=0)
    theta = initial_params(work)
    trainer = Trainer(work, shard=0, n_shards=1, node_id="bench-codecs")
    delta = trainer.train_round(theta, steps=50, lr=1e-2, batch_size=32).delta
    return np.resize(delta.astype(np.float32), n)


def matrices_layout(n: int, cols: int = 1000) -> tuple[Any, ...]:
    """[1000, cols] matrices, then a 1-D remainder."""
    size = 1000 * cols
    shapes: list[tuple[str, tuple[int, ...]]] = [(f"m{i}", (1000, cols)) for i in range(n // size)]
    if n % size:
        shapes.append(("rest", (n % size,)))
    return layout_of(shapes)


def best_of(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def rel_err(x: np.ndarray, y: Any) -> float:
    x64 = x.astype(np.float64)
    return float(np.linalg.norm(np.asarray(y, np.float64) - x64) / np.linalg.norm(x64))


def measure(codec: Codec, x: np.ndarray, pure_n: int) -> dict[str, Any]:
    mb = x.nbytes / 1e6
    layout = matrices_layout(x.size) if codec.name == "powersgd" else None
    t_enc, payload = best_of(lambda: codec.encode(x, layout=layout))
    t_dec, out = best_of(lambda: codec.decode(payload, x.size, layout=layout))
    row: dict[str, Any] = {
        "ratio": round(x.nbytes / len(payload), 3), "rel_err": round(rel_err(x, out), 6),
        "encode_MBps": round(mb / t_enc, 1), "decode_MBps": round(mb / t_dec, 1),
        "encode_MBps_pure": None, "decode_MBps_pure": None}
    xs = x[:pure_n]
    small = array("f", xs.tolist())
    mb_small = xs.nbytes / 1e6
    if codec.name == "powersgd":  # decode only: the encoder needs numpy
        lay = matrices_layout(pure_n, cols=max(1, pure_n // 1000))
        p_small = codec.encode(xs, layout=lay)
    else:
        t_pe, p_small = best_of(lambda: codec.encode(small), repeat=1)
        row["encode_MBps_pure"] = round(mb_small / t_pe, 2)
        assert p_small == codec.encode(xs), f"{codec.name}: pure and numpy payloads differ"
        lay = None
    t_pd, _ = best_of(lambda: codec.decode(p_small, pure_n, layout=lay, use_numpy=False),
                      repeat=1)
    row["decode_MBps_pure"] = round(mb_small / t_pd, 2)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.codecs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000_000, help="values in the vector")
    p.add_argument("--pure-n", type=int, default=200_000,
                   help="values for the pure-Python timings (a prefix of the vector)")
    p.add_argument("--source", choices=("t3", "gpt-tiny"), default="gpt-tiny",
                   help="a real gpt-tiny pseudo-gradient, tiled (default), or Student-t df=3")
    args = p.parse_args(argv)
    x = t3_gradient(args.n) if args.source == "t3" else gpt_tiny_gradient(args.n)
    pure_n = min(args.pure_n, args.n)
    figures: dict[str, dict[str, Any]] = {}
    rows = []
    for label, name, params in CONFIGS:
        row = measure(make_codec(name, **params), x, pure_n)
        figures[label] = row
        rows.append({"codec": label, **{k: ("-" if v is None else f"{v:.4g}" if k == "rel_err"
                                            else f"{v:.1f}" if "MBps" in k else f"{v:.2f}")
                                        for k, v in row.items()}})
    print(f"{args.n:,} float32 values ({args.source}); numpy path on all of them, pure "
          f"Python on the first {pure_n:,}; MB/s of float32 input, best of 3 (pure: 1 run)")
    print_table(rows, ["codec", "ratio", "rel_err", "encode_MBps", "decode_MBps",
                       "encode_MBps_pure", "decode_MBps_pure"])
    emit({"codecs": figures, "source": args.source, "n": args.n})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
