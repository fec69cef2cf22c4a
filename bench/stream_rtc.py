"""Server memory and upload rate of updates over star data channels: streamed against
single-frame.

    python -m bench.stream_rtc                   # llama 2m (1.8M params), 4 participants
    python -m bench.stream_rtc --model gpt-tiny --flavour "" --participants 2 --chunk-mb 0.01

Runs itself inside a private network namespace (bench.netns: loopback + one veth, so aiortc
finds a host candidate; every packet stays inside). For each mode (single frame:
stream_chunk_mb 0, the Submit is one FrameLink frame; streamed: chunks of --chunk-mb, each
Chunk a FrameLink frame of its own) a real server (`python -m server --transport star`, one
round, quorum N, rule --rule) and N participants in this process, each with its own aiortc
data channel to the server's peer (transport.rtc.StarUplink) and the native node's own
upload path (native_node.stream_upload + native_node.stream_rtc): the shared Participant
signs a random raw32 update. Measured as bench.stream does, on the server process (/proc):
its resident set once every participant joined and its channel opened (baseline; the peak is
reset there, clear_refs 5), its peak (VmHWM) once all N updates are acknowledged (one more
member joins and never submits, so the round waits for its deadline and commits only then)
and after the commit; growth = peak - baseline. upload_MBps = N updates' bytes / the seconds
from the first send to the last acknowledgement (all N at once, one process: the server's
and the participants' CPU share the machine). /api/run's `stream` counters say over which
path the frames came. The machine is shared with other jobs: wall times are loose.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench import netns
from bench.common import emit, get_json, poll, print_table
from bench.live import running_server
from bench.stream import Member, _status_kb, drive
from native_node.stream_rtc import StreamRoute
from shared.messages import SERVER, ParamsChunk, Resume, Submit


class StarMember(Member):
    """bench.stream's participant, with a data channel to the server (transport "star")."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.uplink: Any = None  # transport.rtc.StarUplink
        self.ws: Any = None
        self.route = StreamRoute(self)  # type: ignore[arg-type]  # duck-types NodeClient
        self.opened = asyncio.Event()

    async def _start_uplink(self, ev: dict[str, Any]) -> None:
        from transport.rtc import StarUplink

        async def signal(kind: str, data: str) -> None:
            for out in self.part.signal(kind, data):
                if out["kind"] == "send":
                    await self.ws.send_bytes(out["frame"])

        if self.uplink is not None:
            await self.uplink.close()
        self.uplink = StarUplink(signal, timeout_s=float(ev["rtc_timeout_s"]))
        await self.uplink.start()

        async def wait() -> None:
            if await self.uplink.wait_open():
                self.opened.set()
            else:
                self.errors.append("the data channel did not open")

        asyncio.ensure_future(wait())  # noqa: RUF006 - ends with the channel's timeout

    async def run(self, http: aiohttp.ClientSession, base: str) -> None:
        async with http.ws_connect(base + "/ws", max_msg_size=1 << 30, heartbeat=None) as ws:
            self.ws = ws
            async for raw in ws:
                if raw.type != aiohttp.WSMsgType.BINARY:
                    break
                if raw.data[5:6] == bytes((Resume.TYPE,)):
                    self.uploader.on_resume(self.route.socket(ws), raw.data)
                    continue
                if raw.data[5:6] == bytes((ParamsChunk.TYPE,)):
                    events = await self.downloader.on_chunk(ws, raw.data)
                else:
                    events = self.part.receive(raw.data)
                for ev in events:
                    kind = ev["kind"]
                    if kind == "params_stream":
                        events.extend(await self.downloader.start(ws, ev["message"]))
                    if kind == "send":
                        await ws.send_bytes(ev["frame"])
                    elif kind == "welcome":
                        self.n_params = int(ev["n_params"])
                        await self._start_uplink(ev)
                    elif kind == "signal" and ev["from"] == SERVER \
                            and ev["signal"] == "answer":
                        await self.uplink.on_answer(ev["data"])
                    elif kind == "train":
                        self.round = int(ev["round"])
                        self.joined.set()
                        self.job = asyncio.ensure_future(self._submit(ws))
                    elif kind == "ack":
                        self.acked = True
                    elif kind == "committed" and ev["final"]:
                        await self.uplink.close()
                        return
                    elif kind in ("error", "fatal", "refused"):
                        self.errors.append(f"{ev.get('code', '')} {ev['message']}"[:200])

    async def _submit(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        await self.go.wait()  # every participant joined, its channel open: baseline taken
        assert self.round is not None
        rng = np.random.default_rng(self.index)
        delta = rng.standard_normal(self.n_params, dtype=np.float32) * np.float32(1e-3)
        try:
            for ev in self.part.submit(self.round, delta.astype("<f4").tobytes(),
                                       train_loss=1.0, samples=32, compute_s=0.1):
                if ev["kind"] != "send":
                    continue
                frame = ev["frame"]
                if ev["msg_type"] == Submit.TYPE and self.route.takes(frame):
                    await self.route.start(frame)  # StreamSubmit + Chunks on the channel
                elif ev["msg_type"] == Submit.TYPE and await self.uplink.send(frame):
                    pass  # one frame on the channel
                else:
                    self.errors.append("an update went over the WebSocket")
                    await ws.send_bytes(frame)
        except Exception as exc:  # a broken bench must end, not wait for its timeouts
            self.errors.append(f"submit: {exc!r}"[:200])
            await ws.close()
            raise


async def _drive(base: str, pid: int, n: int) -> dict[str, Any]:
    """n submitting members and one idle one (the round waits for its deadline after the n
    updates, so the receipt's peak is read apart from the commit's)."""
    from transport import sctp_tuning

    if not sctp_tuning.installed():  # as a native node does (native_node.client)
        sctp_tuning.install()
    members = [StarMember(i) for i in range(n + 1)]

    async def channels_open() -> dict[str, Any]:
        peers = await asyncio.to_thread(get_json, base + "/api/peers")
        return {"transports": sorted(p["transport"] for p in peers)}

    out = await drive(members, base, pid, n, ready=lambda m: [m.joined.wait(), m.opened.wait()],
                      before=channels_open, poll_s=0.02)
    return {**out, "route": [dict(m.route.counts) for m in members[:n]]}


def run_one(work: Path, *, model: str, flavour: str, n: int, chunk_mb: float, rule: str,
            deadline_s: float) -> dict[str, Any]:
    flags = ["--model", model, "--rounds", "1", "--quorum", str(n), "--deadline-s",
             str(deadline_s), "--inner-steps", "1", "--aggregator", rule, "--max-frame-mb",
             "512", "--stream-chunk-mb", str(chunk_mb), "--log-level", "WARNING",
             "--heartbeat-s", "120", "--transport", "star", "--rtc-timeout-s", "30"]
    if flavour:
        flags += ["--flavour", flavour]
    with running_server(work, *flags) as (base, proc):
        assert proc is not None
        out = asyncio.run(_drive(base, proc.pid, n))
        status = poll(lambda: (r := get_json(base + "/api/run"))["status"] == "finished"
                      and r, 120, "the run to finish")
        peak = _status_kb(proc.pid, "VmHWM") / 1024
    update_b = 4 * out["n_params"]
    return {"mode": "streamed" if chunk_mb else "single", "participants": n,
            "n_params": out["n_params"], "update_mb": round(update_b / 2**20, 2),
            "baseline_rss_mb": round(out["baseline_mb"], 1),
            "receipt_peak_rss_mb": round(out["receipt_peak_mb"], 1),
            "receipt_growth_mb": round(out["receipt_peak_mb"] - out["baseline_mb"], 1),
            "peak_rss_mb": round(peak, 1), "growth_mb": round(peak - out["baseline_mb"], 1),
            "wall_s": round(out["wall_s"], 2),
            "upload_MBps": round(n * update_b / 1e6 / out["wall_s"], 2),
            "acked": out["acked"], "committed_rounds": status["committed_rounds"],
            "peak_reset_after_join": out["peak_reset"], "stream": status["stream"],
            "transports": out["transports"], "rejected": status["rejected"],
            "errors": out["errors"]}


def main(argv: list[str] | None = None) -> int:
    if not netns.inside():
        problem = netns.available()
        if problem is not None:
            print(f"bench.stream_rtc needs a private network namespace: {problem}",
                  file=sys.stderr)
            return 2
        return netns.rerun_inside("bench.stream_rtc", sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama")
    p.add_argument("--flavour", default="2m")
    p.add_argument("--participants", type=int, default=4)
    p.add_argument("--chunk-mb", type=float, default=1.0)
    p.add_argument("--rule", default="median")
    p.add_argument("--deadline-s", type=float, default=60.0,
                   help="round deadline: the updates must be in by then")
    args = p.parse_args(argv)
    rows = []
    for chunk_mb in (0.0, args.chunk_mb):
        with tempfile.TemporaryDirectory(prefix="bench-stream-rtc-") as tmp:
            rows.append(run_one(Path(tmp), model=args.model, flavour=args.flavour,
                                n=args.participants, chunk_mb=chunk_mb, rule=args.rule,
                                deadline_s=args.deadline_s))
    print_table(rows, ["mode", "participants", "update_mb", "baseline_rss_mb",
                       "receipt_growth_mb", "peak_rss_mb", "growth_mb", "wall_s",
                       "upload_MBps", "acked"])
    emit({"bench": "stream_rtc", "model": args.model, "flavour": args.flavour,
          "n_params": rows[0]["n_params"], "update_mb": rows[0]["update_mb"],
          "participants": args.participants, "chunk_mb": args.chunk_mb, "rule": args.rule,
          "receipt_growth_mb": {r["mode"]: r["receipt_growth_mb"] for r in rows},
          "growth_mb": {r["mode"]: r["growth_mb"] for r in rows},
          "upload_MBps": {r["mode"]: r["upload_MBps"] for r in rows}, "rows": rows,
          "note": "2-core machine shared with other jobs: wall_s and upload_MBps are loose"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
