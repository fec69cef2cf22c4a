"""Server memory with streamed updates (stream_chunk_mb) against single-frame updates.

    python -m bench.stream                       # llama 2m (1.8M params), 4 and 16 participants
    python -m bench.stream --model mlp-digits --flavour "" --participants 2 --chunk-mb 0.01

For each mode (single frame: stream_chunk_mb 0; streamed: chunks of --chunk-mb) and each
participant count N, a real server (`python -m server`, one round, quorum N, rule --rule)
and N participants over real WebSockets in this process: the shared Participant (signed
Hello, signed Submit of a random raw32 update), streamed by the native node's own uploader
(native_node.stream_upload) when the server's Welcome asks for it. Measured on the server
process (/proc): its resident set once every participant has joined (baseline; the peak is
reset there, /proc/PID/clear_refs 5, so the startup's does not count); its peak
(VmHWM) once all N updates are acknowledged (receipt; one more member joins and never submits,
so the round waits until that peak is read: the idle member then leaves and the round
commits) and once the round has committed
(the outer step, evaluation and checkpoint included); growth = peak - baseline. The
participants are not native nodes (no training): the figure is the server's receipt, storage
and aggregation.
The machine is shared with other jobs: wall times are loose, memory figures are not.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.common import emit, get_json, poll, print_table
from bench.live import running_server
from native_node.stream_down import Downloader
from native_node.stream_upload import Uploader
from shared.envelope import Identity
from shared.messages import ParamsChunk, Resume, Submit
from shared.participant import Participant


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current resident set (Linux: clear_refs 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class Member:
    """One participant: joins, submits one random update (streamed when asked), leaves."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.part = Participant(Identity.generate(), runtime="native", agent="bench-stream",
                                device="cpu")
        self.uploader = Uploader(self.part)
        self.downloader = Downloader(self.part)  # a RoundOpen larger than a chunk streams too
        self.joined = asyncio.Event()
        self.go = asyncio.Event()
        self.n_params = 0
        self.round: int | None = None
        self.acked = False
        self.errors: list[str] = []
        self.job: asyncio.Future[None] | None = None  # the submission
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def run(self, http: aiohttp.ClientSession, base: str) -> None:
        async with http.ws_connect(base + "/ws", max_msg_size=1 << 30, heartbeat=None) as ws:
            self.ws = ws
            async for raw in ws:
                if raw.type != aiohttp.WSMsgType.BINARY:
                    break
                if raw.data[5:6] == bytes((Resume.TYPE,)):
                    self.uploader.on_resume(ws, raw.data)
                    continue
                if raw.data[5:6] == bytes((ParamsChunk.TYPE,)):
                    events = await self.downloader.on_chunk(ws, raw.data)
                else:
                    events = self.part.receive(raw.data)
                for ev in events:
                    kind = ev["kind"]
                    if kind == "params_stream":
                        events.extend(await self.downloader.start(ws, ev["message"]))
                    if kind == "send":  # a masked update (secagg) is sent from here
                        await self._send(ws, ev)
                    elif kind == "welcome":
                        self.n_params = int(ev["n_params"])
                    elif kind == "train":
                        self.round = int(ev["round"])
                        self.joined.set()
                        self.job = asyncio.ensure_future(self._submit(ws))
                    elif kind == "ack":
                        self.acked = True
                    elif kind == "committed" and ev["final"]:
                        return
                    elif kind in ("error", "fatal", "refused"):
                        self.errors.append(f"{ev.get('code', '')} {ev['message']}"[:200])

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, ev: dict[str, Any]) -> None:
        """A "send" event: an update streamed when the server's Welcome asks for it."""
        if ev["msg_type"] == Submit.TYPE and self.uploader.wants(ev["frame"]):
            await self.uploader.start(ws, ev["frame"])
        else:
            await ws.send_bytes(ev["frame"])

    async def _submit(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        await self.go.wait()  # every participant joined: the baseline is taken
        assert self.round is not None
        rng = np.random.default_rng(self.index)
        delta = rng.standard_normal(self.n_params, dtype=np.float32) * np.float32(1e-3)
        try:
            for ev in self.part.submit(self.round, delta.astype("<f4").tobytes(),
                                       train_loss=1.0, samples=32, compute_s=0.1):
                if ev["kind"] == "send":
                    await self._send(ws, ev)
        except Exception as exc:  # a broken bench must end, not wait for its timeouts
            self.errors.append(f"submit: {exc!r}"[:200])
            await ws.close()
            raise


async def drive(members: list[Any], base: str, pid: int, n: int, *,
                ready: Callable[[Any], list[Awaitable[Any]]] | None = None,
                before: Callable[[], Awaitable[dict[str, Any]]] | None = None,
                poll_s: float = 0.05) -> dict[str, Any]:
    """members[:n] submit, the last one idles: the round then waits (for its deadline) after the
    n updates are in, so the server's peak while receiving them is read apart from the
    commit's (outer step, evaluation, checkpoint); once it is read the idle one leaves and the
    round commits. `ready`: what to await of each member
    before the baseline (its join); `before`: figures to read once all are ready."""
    ready = ready or (lambda m: [m.joined.wait()])
    async with aiohttp.ClientSession() as http:
        tasks = [asyncio.ensure_future(m.run(http, base)) for m in members]
        await asyncio.wait_for(asyncio.gather(*(w for m in members for w in ready(m))), 300)
        await asyncio.sleep(0.5)
        extra = await before() if before is not None else {}
        baseline = _status_kb(pid, "VmRSS") / 1024
        reset = _reset_peak(pid)  # the startup's peak (model, first evaluation) is not ours
        t0 = time.monotonic()
        for m in members[:n]:
            m.go.set()

        async def all_acked() -> None:
            while not all(m.acked for m in members[:n]):
                if any(m.errors for m in members):
                    raise RuntimeError(f"refused: {[m.errors for m in members if m.errors]}")
                await asyncio.sleep(poll_s)

        await asyncio.wait_for(all_acked(), 600)
        wall = time.monotonic() - t0
        receipt_peak = _status_kb(pid, "VmHWM") / 1024
        for m in members[n:]:  # the idle one leaves: the round commits now, not at its deadline
            if m.ws is not None:
                await m.ws.close()
        await asyncio.wait_for(asyncio.gather(*tasks), 600)
        for m in members:
            if m.job is not None:
                m.job.cancel()
    return {"baseline_mb": baseline, "receipt_peak_mb": receipt_peak, "wall_s": wall,
            "peak_reset": reset,
            "acked": sum(m.acked for m in members),
            "errors": [e for m in members for e in m.errors][:5], "n_params": members[0].n_params,
            **extra}


async def _drive(base: str, pid: int, n: int) -> dict[str, Any]:
    return await drive([Member(i) for i in range(n + 1)], base, pid, n)


def run_one(work: Path, *, model: str, flavour: str, n: int, chunk_mb: float,
            rule: str, deadline_s: float, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One server and round; `extra`: more server flags (bench.stream_secagg: --secagg)."""
    flags = ["--model", model, "--rounds", "1", "--quorum", str(n), "--deadline-s",
             str(deadline_s),
             "--inner-steps", "1", "--aggregator", rule, "--max-frame-mb", "512",
             "--stream-chunk-mb", str(chunk_mb), "--log-level", "WARNING",
             "--heartbeat-s", "120", *extra]
    if flavour:
        flags += ["--flavour", flavour]
    with running_server(work, *flags) as (base, proc):
        assert proc is not None
        out = asyncio.run(_drive(base, proc.pid, n))
        status = poll(lambda: (r := get_json(base + "/api/run"))["status"] == "finished"
                      and r, 120, "the run to finish")
        peak = _status_kb(proc.pid, "VmHWM") / 1024
    spool = work / "run" / "spool"
    return {"mode": "streamed" if chunk_mb else "single", "participants": n,
            "n_params": out["n_params"], "update_mb": round(4 * out["n_params"] / 2**20, 2),
            "baseline_rss_mb": round(out["baseline_mb"], 1),
            "receipt_peak_rss_mb": round(out["receipt_peak_mb"], 1),
            "receipt_growth_mb": round(out["receipt_peak_mb"] - out["baseline_mb"], 1),
            "peak_rss_mb": round(peak, 1), "growth_mb": round(peak - out["baseline_mb"], 1),
            "wall_s": round(out["wall_s"], 2),
            "acked": out["acked"], "committed_rounds": status["committed_rounds"],
            "peak_reset_after_join": out["peak_reset"],
            "rejected": status["rejected"], "errors": out["errors"],
            "streamed_transfers": status.get("stream", {}).get("completed", 0),
            "spool_files_left": len(list(spool.iterdir())) if spool.exists() else 0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama")
    p.add_argument("--flavour", default="2m")
    p.add_argument("--participants", default="4,16", help="comma-separated counts")
    p.add_argument("--chunk-mb", type=float, default=1.0)
    p.add_argument("--rule", default="median")
    p.add_argument("--deadline-s", type=float, default=60.0,
                   help="round deadline: the updates must be in by then (an idle member "
                        "holds the round open until it)")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.participants.split(",")]
    rows = []
    for n in counts:
        for chunk_mb in (0.0, args.chunk_mb):
            with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
                rows.append(run_one(Path(tmp), model=args.model, flavour=args.flavour, n=n,
                                    chunk_mb=chunk_mb, rule=args.rule,
                                    deadline_s=args.deadline_s))
    print_table(rows, ["mode", "participants", "update_mb", "baseline_rss_mb",
                       "receipt_growth_mb", "peak_rss_mb", "growth_mb", "wall_s", "acked",
                       "spool_files_left"])
    growth = {f"{r['mode']}_{r['participants']}": r["growth_mb"] for r in rows}
    receipt = {f"{r['mode']}_{r['participants']}": r["receipt_growth_mb"] for r in rows}
    emit({"bench": "stream", "model": args.model, "flavour": args.flavour,
          "n_params": rows[0]["n_params"], "update_mb": rows[0]["update_mb"],
          "chunk_mb": args.chunk_mb, "rule": args.rule, "growth_mb": growth,
          "receipt_growth_mb": receipt, "rows": rows,
          "note": "2-core machine shared with other jobs: wall_s is loose"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
