"""A native node's peak memory with and without chunked encoding of its update (streamed runs:
shared.chunk_encode), through the real system.

    python -m bench.node_stream                          # llama 20m, 1 node, 2 rounds, 2 codecs
    python -m bench.node_stream --flavour tiny --rounds 1 --codecs int8   # the test's
    python -m bench.node_stream --flavour 125m --codecs topk --nodes 4    # bench.scale's 125m

For each codec configuration it runs bench.scale's real server and --nodes real native nodes
(WebSocket transport, streamed uploads in --chunk-mb chunks, the SparseLoCo sparse downlink)
twice: the nodes with `--no-chunk-encode` (the one-shot path: the whole Δ, x = Δ + residual,
the payload and the Submit frame in memory) and with chunked encoding (the default: Δ read a
chunk at a time from the base and trained params, encoded into a spool file, the chunks
read from it). The codecs: "topk" is bench.scale's (top-k 5% with 2-bit values + error
feedback), "int8" int8-block + error feedback (a payload a quarter of Δ).

Measured: each node's peak RSS over the whole run (VmHWM of its process, sampled every
0.25 s, bench.scale: the join, the inner steps and the encoding alike), its peak resident
set while it encodes and hands on its update (its log line: the peak a thread sampling
/proc/self/statm every 2 ms saw, native_node.chunk_update.RssPeak; the largest over
rounds; on the one-shot path Δ is already made when it starts), and from the node's log
that every update took the path asked for.
The 125m figures are ESTIMATES, not runs: the measured saving of the peak while encoding
(one-shot - chunked) scaled by the parameter ratio; for topk taken off
bench/results/scale_125m.txt's one-shot node peak (3,757.3 MB, the inner steps' peak, so
an upper bound of the encoding's).
Memory is not disturbed by the machine's load; times are.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import scale
from bench.common import emit

CODECS = {
    "topk": scale.SPARSE_FLAGS,
    "int8": ["--codec", "int8-block", "--error-feedback", *scale.SPARSE_FLAGS[5:]],
}
P125M, PEAK_125M = 122_728_704, 3757.3  # bench/results/scale_125m.txt (one-shot, topk)
CHUNKED = re.compile(r"update encoded by chunks")
ENCODED = re.compile(r"update encoded (?:by chunks|in one piece)[^:]*: RSS ([\d.]+) MB before, "
                     r"peak ([\d.]+) MB while encoding")


def one_run(a: argparse.Namespace, codec: str, chunked: bool, tmp: Path) -> dict[str, Any]:
    ns = argparse.Namespace(**vars(a), codec_flags=CODECS[codec],
                            node_flags=() if chunked else ("--no-chunk-encode",))
    out = scale.run(ns, tmp)
    logs = [(tmp / f"node{i}.log").read_text(errors="replace") for i in range(a.nodes)]
    n_chunked = [len(CHUNKED.findall(t)) for t in logs]
    enc = [(float(b), float(p)) for t in logs for b, p in ENCODED.findall(t)]
    rounds = int(out["run"]["committed_rounds"])
    return {"codec": codec, "chunked": chunked, "rounds": rounds,
            "node_peak_mb": [round(v, 1) for v in out["node_peak_mb"]],
            "chunked_updates": n_chunked,
            "path_ok": all(k == (rounds if chunked else 0) for k in n_chunked)
            and len(enc) == rounds * a.nodes,
            "encode_peak_mb": round(max(p for _, p in enc), 1) if enc else None,
            "encode_rss_before_mb": round(max(b for b, _ in enc), 1) if enc else None,
            "node_exit_codes": out["node_rc"], "n_params": int(out["run0"]["n_params"]),
            "eval_loss_end": out["rounds"][-1]["eval_loss"] if out["rounds"] else None,
            "wall_s": round(out["wall_s"], 1)}


def figures(a: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    n = runs[0]["n_params"]
    per_codec: dict[str, Any] = {}
    for codec in a.codecs:
        one = next(r for r in runs if r["codec"] == codec and not r["chunked"])
        ch = next(r for r in runs if r["codec"] == codec and r["chunked"])
        saved = max(one["node_peak_mb"]) - max(ch["node_peak_mb"])
        enc = None if None in (one["encode_peak_mb"], ch["encode_peak_mb"]) \
            else round(one["encode_peak_mb"] - ch["encode_peak_mb"], 1)
        per_codec[codec] = {"one_shot_peak_mb": max(one["node_peak_mb"]),
                            "chunked_peak_mb": max(ch["node_peak_mb"]),
                            "saved_mb": round(saved, 1),
                            "one_shot_encode_peak_mb": one["encode_peak_mb"],
                            "chunked_encode_peak_mb": ch["encode_peak_mb"],
                            "encode_peak_saved_mb": enc,
                            "encode_peak_saved_x_model": None if enc is None
                            else round(enc / (4 * n / 1e6), 2),
                            "est_125m_encode_peak_saved_mb": None if enc is None
                            else round(enc * P125M / n, 1)}
    est = per_codec.get("topk", {}).get("est_125m_encode_peak_saved_mb")
    return {"bench": "node_stream", "model": f"{a.model}-{a.flavour}", "params": n,
            "model_mb": round(4 * n / 1e6, 1), "nodes": a.nodes, "rounds": a.rounds,
            "chunk_mb": a.chunk_mb, "per_codec": per_codec, "runs": runs,
            "paths_ok": all(r["path_ok"] for r in runs),
            "est_125m_encode_peak_chunked_mb": None if est is None
            else round(PEAK_125M - est, 1),
            "est_method": "125m: the encoding's peak saving scaled by params (122,728,704 / "
                          "measured); the topk one taken off the one-shot 125m node peak "
                          "3757.3 MB (scale_125m.txt) as an upper bound of its encoding "
                          "peak; estimates, not runs",
            "note": "2-core machine shared with other jobs: times are loose, memory is not"}


def print_table(f: dict[str, Any]) -> None:
    print(f"bench.node_stream: {f['model']} ({f['params']:,} params, {f['model_mb']} MB "
          f"float32), {f['nodes']} native node(s), {f['rounds']} rounds, streamed uploads "
          f"({f['chunk_mb']} MB chunks)")
    print("codec | whole run: node peak MB one-shot | chunked | saved | while encoding: peak "
          "MB one-shot | chunked | saved | saved x model | 125m saved MB (est.)")
    for codec, c in f["per_codec"].items():
        print(f"{codec} | {c['one_shot_peak_mb']} | {c['chunked_peak_mb']} | {c['saved_mb']} | "
              f"{c['one_shot_encode_peak_mb']} | {c['chunked_encode_peak_mb']} | "
              f"{c['encode_peak_saved_mb']} | {c['encode_peak_saved_x_model']} | "
              f"{c['est_125m_encode_peak_saved_mb']}")
    print(f"path taken as asked in every run: {'yes' if f['paths_ok'] else 'NO'}")
    print(f"125m, topk: the encoding's peak at most {f['est_125m_encode_peak_chunked_mb']} MB "
          f"with chunked encoding (estimate); the whole run's node peak, {PEAK_125M} MB "
          f"one-shot, is the inner steps' (docs/benchmarks.md), which this does not change")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama")
    p.add_argument("--flavour", default="20m")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--inner-steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--inner-lr", type=float, default=None,
                   help="default 1e-3, and 1e-5 for the 125m flavour (as bench.scale)")
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--chunk-mb", type=float, default=0.25)
    p.add_argument("--deadline-s", type=float, default=3600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codecs", nargs="+", choices=sorted(CODECS), default=["topk", "int8"])
    p.add_argument("--timeout", type=float, default=1800.0, help="each run (s)")
    a = p.parse_args(argv)
    a.stagger = True
    if a.inner_lr is None:
        a.inner_lr = 1e-5 if a.flavour == "125m" else 1e-3
    runs = []
    for codec in a.codecs:
        for chunked in (False, True):
            with tempfile.TemporaryDirectory(prefix="bench-node-stream-") as tmp:
                print(f"[node_stream] {codec}, {'chunked' if chunked else 'one-shot'}",
                      file=sys.stderr, flush=True)
                runs.append(one_run(a, codec, chunked, Path(tmp)))
    f = figures(a, runs)
    print_table(f)
    emit(json.loads(json.dumps(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
