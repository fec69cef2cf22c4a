"""Overlapped rounds (run option `overlap`, shared.overlap): compute utilization with and without.

    python -m bench.overlap [--quick] [--nodes 2] [--rounds 20] [--steps 200] [--delays 0,0.1]

For each one-way latency and each mode (overlap off, on): the REAL server and REAL native
nodes (subprocesses, signed frames over WebSocket), each node connected through its own link
relay (bench.netfault's relay, `LinkRelay` below): every WebSocket message is sent once the
ones before it in its direction are, at 100 Mbit/s, and arrives `delay` seconds later (a real
delay at the transport; `tc netem` is not available here). The time a node waits between its
Submit of round t and the RoundOpen of round t+1 is then at least two latencies + both
transfers + the server's aggregation, outer step, evaluation and commit.

Utilization is bench.vs_ddp's loopback `utilization`: each node's compute time (the
`compute_s` of its accepted updates: forward + backward + optimizer, steps run ahead
included; mean over nodes) over the run's wall time (round durations from the server), but
over rounds 1.. only: vs_ddp charges round 0 (which also waits for the nodes to start) its
slowest node's compute plus the other rounds' mean overhead, which assumes no overlap (that
figure, `utilization_vs_ddp_formula`, is kept in the JSON; with overlap it exceeds 1).
Compute time is wall time of the steps: on a loaded machine, steps that run while the server
aggregates are slower, which inflates the overlap run's compute; `round_s` (mean round
duration) is the figure that does not depend on it. bench.vs_ddp's modelled-WAN figure is not
used: it assumes the idle time that overlap removes. The final held-out
loss of both modes is reported: steps run ahead start from stale params (one-step delay).
LAST stdout line: JSON (bench.common.emit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.common import emit, print_table
from bench.netfault import Relay, RelayThread
from bench.vs_ddp import Grid, run_diloco, summarize_diloco


class LinkRelay(Relay):
    """bench.netfault's relay as a link, each direction on its own: a message is sent once the
    ones before it are (at `bandwidth_bps`) and arrives `latency_s` after that, in order."""

    def __init__(self, upstream: str, *, latency_s: float, bandwidth_bps: float) -> None:
        super().__init__(upstream)
        self.latency_s, self.bandwidth_bps = latency_s, bandwidth_bps

    async def _pump(self, src: Any, dst: Any, direction: str) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, msg = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not await self._forward(dst, msg, direction):
                    return

        task = asyncio.create_task(deliver())
        free_at = 0.0  # when the link has sent what is queued
        try:
            async for msg in src:
                if msg.type not in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                    continue
                free_at = max(loop.time(), free_at) + 8 * len(msg.data) / self.bandwidth_bps
                queue.put_nowait((free_at + self.latency_s, msg))
        finally:
            task.cancel()

MERGED_LINE = "overlapped with the previous round's upload"  # native_node.training's log
BANDWIDTH = 100e6  # bits/s each way per node (bench.vs_ddp's modelled link)


def run_one(tmp: Path, g: Grid, *, h: int, delay_s: float, overlap: bool, timeout: float,
            outer: tuple[float, float] = (1.0, 0.0)) -> dict[str, Any]:
    """One run (bench.vs_ddp.run_diloco): server, relay with `delay_s` each way, g.workers
    nodes until they leave."""

    @contextlib.contextmanager
    def link(port: int) -> Iterator[int]:
        relay = RelayThread(f"127.0.0.1:{port}")
        relay.relay = LinkRelay(f"127.0.0.1:{port}", latency_s=delay_s,
                                bandwidth_bps=BANDWIDTH)
        try:
            yield relay.start()
        finally:
            relay.stop()

    out = run_diloco(tmp, g, h, "raw32", timeout, via=link, extra_flags=(
        "--outer-lr", str(outer[0]), "--outer-momentum", str(outer[1]),
        "--overlap" if overlap else "--no-overlap"))
    out["merged"] = [(tmp / f"node{i}.log").read_text(errors="replace").count(MERGED_LINE)
                     for i in range(g.workers)]  # rounds whose steps ran ahead, per node
    return out


def figures(g: Grid, h: int, out: dict[str, Any], *, delay_s: float,
            overlap: bool) -> dict[str, Any]:
    s = summarize_diloco(g, h, "raw32", out, netns=False)
    dur = np.array([r["duration_s"] for r in out["rounds"]], dtype=float)
    # rounds 1.. only: vs_ddp charges round 0 (which waits for the nodes to start) its
    # slowest compute plus the others' mean overhead, which assumes no overlap (with it, part
    # of round 1's compute runs during round 0: utilization came out above 1); from round 1
    # on, the steps run ahead of round r+1 within the window stand in for those of round 1
    compute = float(out["compute"][1:].sum(axis=0).mean())
    wall = float(dur[1:].sum())
    return {"config": f"delay {delay_s:g}s overlap {'on' if overlap else 'off'}",
            "delay_s": delay_s, "overlap": overlap, "rounds": s["rounds"],
            "rounds_run_ahead": out["merged"],
            "compute_s": round(compute, 3), "wall_s": round(wall, 3),
            "utilization": round(compute / wall, 4),
            "utilization_vs_ddp_formula": round(s["utilization"], 4),
            "round_s": round(float(np.mean(dur[1:])), 3),
            "final_eval_loss": round(float(s["final_eval_loss"]), 4),
            "loss_last5_mean": round(float(np.mean([r["eval_loss"]
                                                    for r in out["rounds"][-5:]])), 4),
            "eval_loss_init": round(float(out["run"]["eval_loss_init"]), 4),
            "losses": [round(float(r["eval_loss"]), 4) for r in out["rounds"]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.overlap", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 nodes, 4 rounds of 100 steps, "
                    "latency 0.1 s only (the test's configuration)")
    ap.add_argument("--model", default="mlp-digits")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200, help="H: inner steps per round")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--outer-lr", type=float, default=1.0,
                    help="outer lr (1.0 with momentum 0: plain averaging, bench.vs_ddp's "
                         "raw32-avg for mlp-digits)")
    ap.add_argument("--outer-momentum", type=float, default=0.0)
    ap.add_argument("--delays", default="0,0.1",
                    help="one-way latency of each node's link, seconds (comma-separated)")
    ap.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    a = ap.parse_args(argv)
    if a.quick:
        a.nodes, a.rounds, a.steps, a.delays = 2, 4, 100, "0.1"
    delays = [float(d) for d in a.delays.split(",")]
    if a.rounds < 3:
        ap.error("--rounds must be >= 3 (utilization is measured from round 1 on)")
    g = Grid(a.model, None, a.nodes, a.rounds * a.steps, a.batch_size, a.lr,
             ((a.steps, "raw32"),), a.steps)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-overlap-") as tmp:
        for delay in delays:
            for overlap in (False, True):
                name = f"d{delay:g}-{'on' if overlap else 'off'}"
                print(f"running {name} ...", file=sys.stderr, flush=True)
                out = run_one(Path(tmp) / name, g, h=a.steps, delay_s=delay, overlap=overlap,
                              timeout=a.timeout, outer=(a.outer_lr, a.outer_momentum))
                rows.append(figures(g, a.steps, out, delay_s=delay, overlap=overlap))
    print(f"overlap: {a.model}, {a.nodes} native nodes, {a.rounds} rounds of H={a.steps}, "
          f"batch {a.batch_size}, outer lr {a.outer_lr} momentum {a.outer_momentum};"
          f" link: latency as given + 100 Mbit/s each way per node; "
          f"utilization = compute / wall per node, rounds 1..")
    print_table(rows, ["config", "rounds", "compute_s", "wall_s", "round_s", "utilization",
                       "eval_loss_init", "final_eval_loss", "loss_last5_mean"])
    by = {(r["delay_s"], r["overlap"]): r for r in rows}
    gains = {f"{d:g}": {"utilization_off": by[(d, False)]["utilization"],
                        "utilization_on": by[(d, True)]["utilization"],
                        "utilization_gain": round(by[(d, True)]["utilization"]
                                                  - by[(d, False)]["utilization"], 4),
                        "round_s_off": by[(d, False)]["round_s"],
                        "round_s_on": by[(d, True)]["round_s"],
                        "final_eval_loss_off": by[(d, False)]["final_eval_loss"],
                        "final_eval_loss_on": by[(d, True)]["final_eval_loss"],
                        "loss_last5_mean_off": by[(d, False)]["loss_last5_mean"],
                        "loss_last5_mean_on": by[(d, True)]["loss_last5_mean"]}
             for d in delays}
    emit({"model": a.model, "nodes": a.nodes, "rounds": a.rounds, "steps": a.steps,
          "batch_size": a.batch_size, "outer_lr": a.outer_lr,
          "outer_momentum": a.outer_momentum, "delays_s": delays, "by_delay": gains, "runs": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
