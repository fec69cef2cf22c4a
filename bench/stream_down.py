"""Server memory while nodes download the params: streamed RoundOpen vs one frame.

    python -m bench.stream_down                  # llama 20m (72.5 MiB of params), 1 and 4 joiners
    python -m bench.stream_down --flavour tiny --joiners 2 --chunk-mb 0.05

For each mode (single frame: stream_chunk_mb 0; streamed: chunks of --chunk-mb; the
server's streamed downlink, server/stream_down.py) and each joiner count N: a real server
(`python -m server`, one round whose quorum N + 1 is never met while we measure) and N
participants over real WebSockets in this process, all joining at once: the shared
Participant (signed Hello, the RoundOpen checked against its params digest), and in the
streamed mode the native node's own downloader (native_node/stream_down.py). Measured on the
server process (/proc): its resident set before anyone joins (baseline; its peak is reset
there, /proc/PID/clear_refs 5) and its peak (VmHWM) once every joiner holds the params
(growth = peak - baseline), and the wall time until then. The joiners are not native nodes
(no training): the figure is the server's cost of handing out the params.
The machine is shared with other jobs: wall times are loose, memory figures are not.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import emit, print_table
from bench.live import running_server
from bench.stream import _reset_peak, _status_kb
from native_node.stream_down import Downloader
from shared.envelope import Identity
from shared.messages import ParamsChunk
from shared.participant import Participant
from shared.stream_down import FEATURE


class Joiner:
    """One participant: joins, gets the round's params (streamed when so sent), stays."""

    def __init__(self) -> None:
        self.part = Participant(Identity.generate(), runtime="native", agent="bench-down",
                                device="cpu")
        self.part.extra_features = (FEATURE,)  # fetches streamed RoundOpens, as native nodes
        self.downloader = Downloader(self.part)
        self.done = asyncio.Event()
        self.streamed = False
        self.params_bytes = 0
        self.errors: list[str] = []

    async def run(self, http: aiohttp.ClientSession, base: str) -> None:
        async with http.ws_connect(base + "/ws", max_msg_size=1 << 30, heartbeat=None) as ws:
            async for raw in ws:
                if raw.type != aiohttp.WSMsgType.BINARY:
                    break
                if raw.data[5:6] == bytes((ParamsChunk.TYPE,)):
                    events = await self.downloader.on_chunk(ws, raw.data)
                else:
                    events = self.part.receive(raw.data)
                for ev in events:  # the list grows while it is walked (a fetch's events)
                    kind = ev["kind"]
                    if kind == "send":
                        await ws.send_bytes(ev["frame"])
                    elif kind == "params_stream":
                        self.streamed = True
                        events.extend(await self.downloader.start(ws, ev["message"]))
                    elif kind == "train":
                        self.params_bytes = len(ev["params"])
                        self.done.set()
                    elif kind in ("error", "fatal", "refused", "reconnect"):
                        self.errors.append(f"{ev.get('code', '')} {ev['message']}"[:200])


async def _drive(base: str, pid: int, n: int) -> dict[str, Any]:
    await asyncio.sleep(1.0)  # the server settles after its start (first evaluation)
    baseline = _status_kb(pid, "VmRSS") / 1024
    reset = _reset_peak(pid)
    joiners = [Joiner() for _ in range(n)]
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as http:
        tasks = [asyncio.ensure_future(j.run(http, base)) for j in joiners]

        async def all_done() -> None:
            while not all(j.done.is_set() for j in joiners):
                if any(j.errors for j in joiners) or any(t.done() for t in tasks):
                    raise RuntimeError(f"joiners failed: {[j.errors for j in joiners]}")
                await asyncio.sleep(0.02)

        try:
            await asyncio.wait_for(all_done(), 600)
        finally:
            wall = time.monotonic() - t0
            peak = _status_kb(pid, "VmHWM") / 1024
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return {"baseline_mb": baseline, "peak_mb": peak, "wall_s": wall, "peak_reset": reset,
            "streamed": sum(j.streamed for j in joiners),
            "params_mb": joiners[0].params_bytes / 2**20,
            "errors": [e for j in joiners for e in j.errors][:5]}


def run_one(work: Path, *, model: str, flavour: str, n: int, chunk_mb: float) -> dict[str, Any]:
    flags = ["--model", model, "--rounds", "1", "--quorum", str(n + 1), "--deadline-s",
             "900", "--inner-steps", "1", "--max-frame-mb", "1024",
             "--stream-chunk-mb", str(chunk_mb), "--log-level", "WARNING",
             "--heartbeat-s", "300"]
    if flavour:
        flags += ["--flavour", flavour]
    with running_server(work, *flags) as (base, proc):
        assert proc is not None
        out = asyncio.run(_drive(base, proc.pid, n))
    return {"mode": "streamed" if chunk_mb else "single", "joiners": n,
            "params_mb": round(out["params_mb"], 2),
            "baseline_rss_mb": round(out["baseline_mb"], 1),
            "peak_rss_mb": round(out["peak_mb"], 1),
            "growth_mb": round(out["peak_mb"] - out["baseline_mb"], 1),
            "wall_s": round(out["wall_s"], 2), "streamed_joins": out["streamed"],
            "peak_reset_before_join": out["peak_reset"], "errors": out["errors"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama")
    p.add_argument("--flavour", default="20m")
    p.add_argument("--joiners", default="1,4", help="comma-separated counts")
    p.add_argument("--chunk-mb", type=float, default=4.0)
    args = p.parse_args(argv)
    rows = []
    for n in [int(x) for x in args.joiners.split(",")]:
        for chunk_mb in (0.0, args.chunk_mb):
            with tempfile.TemporaryDirectory(prefix="bench-stream-down-") as tmp:
                rows.append(run_one(Path(tmp), model=args.model, flavour=args.flavour, n=n,
                                    chunk_mb=chunk_mb))
    print_table(rows, ["mode", "joiners", "params_mb", "baseline_rss_mb", "peak_rss_mb",
                       "growth_mb", "wall_s", "streamed_joins"])
    emit({"bench": "stream_down", "model": args.model, "flavour": args.flavour,
          "params_mb": rows[0]["params_mb"], "chunk_mb": args.chunk_mb,
          "growth_mb": {f"{r['mode']}_{r['joiners']}": r["growth_mb"] for r in rows},
          "wall_s": {f"{r['mode']}_{r['joiners']}": r["wall_s"] for r in rows}, "rows": rows,
          "note": "2-core machine shared with other jobs: wall_s is loose"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
