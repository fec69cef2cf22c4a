"""Our p2p reduction beside hivemind's DecentralizedAverager: the same tensors, peer counts and
machine (loopback).

    python -m bench.vs_hivemind [--peers 4 16] [--size 1000000] [--rounds 3]
        [--venv ~/.cache/daa-prime/venv-hivemind] [--setup] [--skip-hivemind]

hivemind (HIVEMIND_VERSION, numpy < 2.4: with numpy 2.4 its 8-bit quantization raises inside
the averager and a round "succeeds" having averaged nothing) lives in its own venv, created
by --setup (torch TORCH_VERSION first, the CPU wheel on disk), never in the project's. Its side
is bench.hivemind_side: DecentralizedAverager with no compression and with 8-bit (uniform)
quantization. Ours is bench.p2p_peers: each peer a process running native_node.p2p.P2PRole
over aiortc data channels, owners' results in raw32 or fp16 (the run's p2p_result_codec),
1 owner per shard (no cross-check, as hivemind) or 2 (`--ours raw32:2`, the run default
p2p_replicas: the server compares the owners' results). Every peer holds 1M float32
(--size), the same seeded tensors on both sides.

Per configuration: round_s (median of --rounds timed all-reduces; round 0 opens connections
and is not timed), MB_per_peer (bytes each peer sends per round: hivemind's serialized tensor
parts; our signed frames on channels and to the server), rel_err and max_abs_err (worst peer
against the exact float64 mean: relative L2, max absolute). For each peer count the JSON's
`hivemind` and `ours` are each side's fastest configuration at 32-bit error (rel_err <=
--exact-err: both lossless), `lossy` the fastest of any error with the error stated.

Prints a table and, LAST, JSON: hivemind, ours ({"4": {round_s, MB_per_peer, config,
rel_err, max_abs_err}, "16": ...}), lossy, configs (every row), size, rounds,
faster_at_no_more_bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.p2p_peers import REPO, run_ours, tensor

HIVEMIND_VERSION = "1.1.12"
TORCH_VERSION = "2.13.0"
DEFAULT_VENV = Path.home() / ".cache" / "daa-prime" / "venv-hivemind"
OURS = ("raw32:1", "fp16:1")  # result codec : owners per shard ("raw32:2": the run default)
HIVEMIND = ("none", "8bit")


def hivemind_missing(venv: Path) -> str | None:
    py = venv / "bin" / "python"
    if not py.exists():
        return f"no hivemind venv at {venv} (python -m bench.vs_hivemind --setup creates it)"
    probe = subprocess.run([str(py), "-c", "from importlib.metadata import version as v; "
                            "v('hivemind'), v('torch'); "
                            "assert tuple(map(int, v('numpy').split('.')[:2])) < (2, 4)"],
                           capture_output=True, text=True, check=False)  # installed, not imported
    return None if probe.returncode == 0 else f"hivemind venv {venv} is incomplete or has " \
        f"numpy >= 2.4: {probe.stderr.strip().splitlines()[-1:]}"


def setup_venv(venv: Path) -> None:
    if hivemind_missing(venv) is None:
        return
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={TORCH_VERSION}"], check=True)
    subprocess.run([*pip, f"hivemind=={HIVEMIND_VERSION}", "numpy<2.4"], check=True)


def run_hivemind(*, venv: Path, peers: int, size: int, compression: str, rounds: int,
                 timeout: float = 900) -> dict[str, Any]:
    cmd = [str(venv / "bin" / "python"), "-m", "bench.hivemind_side", "--peers", str(peers),
           "--size", str(size), "--compression", compression, "--rounds", str(rounds)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"hivemind side failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"side": "hivemind", "config": compression, "peers": peers,
            "round_s": out["round_s"], "rounds_s": out["rounds_s"],
            "MB_per_peer": out["MB_per_peer"], "max_abs_err": out["max_abs_err"],
            "rel_err": out["rel_err"], "match_s": out["match_s"], "version": out["hivemind"],
            "numpy": out["numpy"]}


def run_our_config(*, peers: int, size: int, config: str, rounds: int) -> dict[str, Any]:
    codec, replicas = config.split(":")
    out = asyncio.run(run_ours(peers=peers, size=size, codec=codec, rounds=rounds,
                               replicas=int(replicas)))
    exact = np.mean([tensor(0, i, size).astype(np.float64) for i in range(peers)], axis=0)
    diff = out["aggregate"].astype(np.float64) - exact
    return {"side": "ours", "config": config, "peers": peers, "round_s": out["round_s"],
            "rounds_s": out["rounds_s"], "MB_per_peer": out["MB_per_peer"],
            "MB_recv_per_peer": out["MB_recv_per_peer"],
            "max_abs_err": float(np.abs(diff).max()),
            "rel_err": float(np.linalg.norm(diff) / np.linalg.norm(exact))}


def best(rows: list[dict[str, Any]], side: str, peers: int, max_err: float | None
         ) -> dict[str, Any] | None:
    fit = [r for r in rows if r["side"] == side and r["peers"] == peers
           and (max_err is None or r["rel_err"] <= max_err)]
    if not fit:
        return None
    r = min(fit, key=lambda r: r["round_s"])
    return {k: r[k] for k in ("round_s", "MB_per_peer", "config", "rel_err", "max_abs_err")}


def summarize(rows: list[dict[str, Any]], peer_counts: list[int], exact_err: float
              ) -> dict[str, Any]:
    figures: dict[str, Any] = {"hivemind": {}, "ours": {}, "lossy": {},
                               "faster_at_no_more_bytes": {}}
    for n in peer_counts:
        key = str(n)
        h, o = best(rows, "hivemind", n, exact_err), best(rows, "ours", n, exact_err)
        figures["hivemind"][key], figures["ours"][key] = h, o
        figures["lossy"][key] = {"hivemind": best(rows, "hivemind", n, None),
                                 "ours": best(rows, "ours", n, None)}
        if h is not None and o is not None:
            figures["faster_at_no_more_bytes"][key] = bool(
                o["round_s"] < h["round_s"] and o["MB_per_peer"] <= h["MB_per_peer"])
    return figures


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = [f"{'side':<9} {'peers':>5} {'config':<8} {'round_s':>8} {'MB_per_peer':>11} "
           f"{'rel_err':>9} {'max_abs_err':>11}  rounds_s"]
    for r in rows:
        out.append(f"{r['side']:<9} {r['peers']:>5} {r['config']:<8} {r['round_s']:>8.3f} "
                   f"{r['MB_per_peer']:>11.3f} {r['rel_err']:>9.2e} {r['max_abs_err']:>11.2e}"
                   f"  {r['rounds_s']}")
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.vs_hivemind", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, nargs="+", default=[4, 16])
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--setup", action="store_true", help="create hivemind's venv if absent")
    p.add_argument("--skip-hivemind", action="store_true", help="only our side")
    p.add_argument("--ours", nargs="+", default=list(OURS), metavar="CODEC:OWNERS")
    p.add_argument("--hivemind", nargs="+", default=list(HIVEMIND), choices=HIVEMIND)
    p.add_argument("--exact-err", type=float, default=1e-6,
                   help="rel_err that counts as lossless (float32 rounding)")
    args = p.parse_args(argv)
    for cfg in args.ours:
        codec, _, owners = cfg.partition(":")
        if codec not in ("raw32", "fp16", "bf16") or not owners.isdigit() or int(owners) < 1:
            p.error(f"--ours {cfg!r}: CODEC:OWNERS with CODEC raw32, fp16 or bf16")
    if min(args.peers) < 2 or args.size < 1 or args.rounds < 1:
        p.error("--peers >= 2, --size >= 1, --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from bench.common import emit

    args = parse(argv)
    if not args.skip_hivemind:
        if args.setup:
            setup_venv(args.venv)
        why = hivemind_missing(args.venv)
        if why is not None:
            raise SystemExit(why)
    rows: list[dict[str, Any]] = []
    for n in args.peers:
        if not args.skip_hivemind:
            for comp in args.hivemind:
                rows.append(run_hivemind(venv=args.venv, peers=n, size=args.size,
                                         compression=comp, rounds=args.rounds))
                print(table(rows)[-1], file=sys.stderr, flush=True)
        for cfg in args.ours:
            rows.append(run_our_config(peers=n, size=args.size, config=cfg,
                                       rounds=args.rounds))
            print(table(rows)[-1], file=sys.stderr, flush=True)
    print(f"{args.size:,} float32 per peer, loopback, {args.rounds} timed rounds (median); "
          "ours CODEC:OWNERS = result codec : owners per shard")
    print("\n".join(table(rows)))
    emit({**summarize(rows, args.peers, args.exact_err), "configs": rows, "size": args.size,
          "rounds": args.rounds})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
