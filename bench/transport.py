"""Data-channel throughput, and what the server moves per round in `star` vs `p2p`.

    python -m bench.transport [--mb 16] [--repeats 3] [--peers 4 8 16] [--no-chromium]
                              [--stock-sctp]   (aiortc without transport.sctp_tuning)
Every aiortc peer runs on the loop transport.evloop picks (uvloop when installed, as nodes
and the server do; DAA_EVENT_LOOP=asyncio for asyncio's own).

Inside a private network namespace the bench creates (bench.netns; every packet stays in it):

1. One 16 MB frame over one data channel: aiortc <-> aiortc twice, both peers in one process
   (one core runs both SCTP stacks) and with the receiver in a second process, as a node and
   the server are deployed (`aiortc-aiortc` in the JSON; the one-process figure is
   `aiortc-aiortc-1process`); then Chromium -> aiortc and Chromium <-> Chromium (headless,
   browser/node/rtcbench.html). Frames go through transport.rtc.FrameLink (shared.rtc chunks
   under the 256 KiB message limit, backpressure on bufferedAmount, reassembly with the SHA-256
   check); the clock stops when the receiver holds the whole, verified frame.
2. For each topology (`star`, `p2p`) and each --peers count: a real server and that many real
   native nodes on gpt-tiny --flavour (micro: 3.27 MB updates), one inner step per round; the
   server's own byte counters per round (/api/rounds, in + out), averaged over the rounds after
   the first, and in p2p each node's shard bytes over its update size (from its log).
   Owners send reduced shards in --p2p-result-codec (fp16, the run default).
3. With --quality ROUNDS: 4-node p2p runs with each result codec (raw32, fp16, bf16) and
   --quality-steps inner steps per round: the eval loss each reaches, so the cost of sending
   the aggregate in 16 bits is measured, not assumed.

Prints tables and, last, JSON: MBps per pair, server_bytes_per_round {star, p2p} per peer
count, p2p_16_over_4, peer_bytes_over_update (the worst node, sent or received).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import netns
from bench.common import children, emit, free_port, get_json, poll, print_table
from transport import evloop


async def aiortc_pair(size: int, repeats: int, *, check_cancel: bool = False
                      ) -> list[dict[str, Any]]:
    from transport.rtc import FrameLink, connect_pair

    a, b, chan_a, chan_b = await connect_pair()
    done: asyncio.Queue[bytes] = asyncio.Queue()
    sender = FrameLink(chan_a)
    receiver = FrameLink(chan_b, on_frame=done.put_nowait, max_frame=max(size, 16_000_000) + 1024)
    rows = []
    try:
        for i in range(repeats):
            frame = os.urandom(size)
            t0 = time.perf_counter()
            await sender.send_frame(frame)
            got = await asyncio.wait_for(done.get(), timeout=300)
            dt = time.perf_counter() - t0
            assert got == frame
            rows.append({"pair": "aiortc-aiortc", "run": i, "MB": size / 1e6,
                         "seconds": round(dt, 3), "MBps": round(size / 1e6 / dt, 2)})
            print(f"aiortc-aiortc run {i}: {size / 1e6:.1f} MB in {dt:.2f} s", file=sys.stderr)
        if check_cancel:  # a transfer cancelled mid-way is dropped; the channel goes on
            cancel = asyncio.Event()
            asyncio.get_running_loop().call_later(0.05, cancel.set)
            assert not await sender.send_frame(os.urandom(16_000_000), cancel=cancel)
            small = os.urandom(1000)
            await sender.send_frame(small)
            assert await asyncio.wait_for(done.get(), timeout=60) == small
            assert receiver.reasm.cancelled == 1
            assert not receiver.reasm.open
            print("cancel mid-transfer: dropped by the receiver, channel still usable",
                  file=sys.stderr)
    finally:
        await a.close()
        await b.close()
    assert not receiver.errors, receiver.errors
    return rows


async def receiver_process() -> None:
    """`--receiver`: the answering aiortc peer in its own process. Reads the offer (one JSON
    line on stdin), answers on stdout, then prints one JSON line per received frame (its
    size and the wall-clock time the verified frame was complete)."""
    import json

    from aiortc import RTCPeerConnection, RTCSessionDescription

    from transport.rtc import FrameLink, rtc_config

    loop = asyncio.get_running_loop()
    pc = RTCPeerConnection(rtc_config())
    links: list[FrameLink] = []

    def on_frame(frame: bytes) -> None:
        print(json.dumps({"bytes": len(frame), "at": time.time()}), flush=True)

    pc.on("datachannel", lambda ch: links.append(FrameLink(ch, on_frame=on_frame,
                                                           max_frame=64_000_000)))
    offer = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type="offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    print(json.dumps({"sdp": pc.localDescription.sdp}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # EOF or "bye": done
    await pc.close()


async def aiortc_processes(size: int, repeats: int, *, stock: bool = False
                           ) -> list[dict[str, Any]]:
    """aiortc -> aiortc with each peer in its own process (as a node and the server are):
    each side's SCTP, DTLS and chunking get their own core."""
    import json

    from aiortc import RTCPeerConnection, RTCSessionDescription

    from transport.rtc import FrameLink, rtc_config

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.transport", "--receiver",
        *(["--stock-sctp"] if stock else []), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None
    assert proc.stdout is not None
    pc = RTCPeerConnection(rtc_config())
    chan = pc.createDataChannel("frames", ordered=True)
    opened = asyncio.Event()
    chan.on("open", opened.set)
    rows = []
    try:
        await pc.setLocalDescription(await pc.createOffer())
        proc.stdin.write((json.dumps({"sdp": pc.localDescription.sdp}) + "\n").encode())
        await proc.stdin.drain()
        answer = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        await asyncio.wait_for(opened.wait(), 30)
        sender = FrameLink(chan)
        for i in range(repeats):
            frame = os.urandom(size)
            t0 = time.time()
            await sender.send_frame(frame)
            got = json.loads(await asyncio.wait_for(proc.stdout.readline(), 300))
            assert got["bytes"] == size, got
            dt = got["at"] - t0
            rows.append({"pair": "aiortc-aiortc (2 processes)", "run": i, "MB": size / 1e6,
                         "seconds": round(dt, 3), "MBps": round(size / 1e6 / dt, 2)})
            print(f"aiortc-aiortc, 2 processes, run {i}: {size / 1e6:.1f} MB in {dt:.2f} s",
                  file=sys.stderr)
    finally:
        await pc.close()
        proc.stdin.write(b"bye\n")
        with contextlib.suppress(Exception):
            await proc.stdin.drain()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
    return rows


SHARD_LOG = re.compile(r"round (\d+): holding the aggregate .*shard bytes this round: (\d+) "
                       r"sent, (\d+) received, update (\d+)")


def topology_run(tmp: Path, topology: str, n: int, *, rounds: int, flavour: str,
                 replicas: int = 2, result_codec: str = "fp16", inner_steps: int = 1
                 ) -> dict[str, Any]:
    """A real server and n real native nodes (gpt-tiny `flavour`, one inner step per round) in
    this namespace; the server's bytes in + out per round (its own counters, /api/rounds),
    averaged over the rounds after the first (round 0 carries the start-up: full params,
    channel set-up), and in p2p each node's shard bytes against its update size."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with children(tmp) as spawn:
        spawn("server", "-m", "server", "--data-dir", str(tmp / "run"), "--port", str(port),
              "--model", "gpt-tiny", "--flavour", flavour, "--inner-steps", str(inner_steps),
              "--batch-size", "4", "--quorum", str(n), "--rounds", str(rounds),
              "--deadline-s", "120", "--transport", topology, "--aggregator", "median",
              "--rtc-timeout-s", "120", "--p2p-timeout-s", "120", "--p2p-replicas",
              str(replicas), "--p2p-result-codec", result_codec)
        for i in range(n):
            spawn(f"node{i}", "-m", "native_node", "join", "--coordinator", f"127.0.0.1:{port}",
                  "--name", f"node{i}", "--state-dir", str(tmp / f"node{i}"), "--threads", "1",
                  "--quiet")
        poll(lambda: len(get_json(url + "/api/rounds")) >= rounds, 900,
             f"{rounds} rounds of {topology} with {n} nodes (logs in {tmp})")
        rows = get_json(url + "/api/rounds")
    steady = [r for r in rows if r["round"] >= 1]
    server = statistics.fmean(r["bytes_up"] + r["bytes_down"] for r in steady)
    ratios = []
    for i in range(n):
        for m in SHARD_LOG.finditer((tmp / f"node{i}.log").read_text(errors="replace")):
            if int(m.group(1)) >= 1:
                sent, got, update = (int(m.group(k)) for k in (2, 3, 4))
                ratios.append((sent / update, got / update))
    out: dict[str, Any] = {
        "topology": topology, "peers": n, "replicas": replicas if topology == "p2p" else None,
        "result_codec": result_codec if topology == "p2p" else None,
        "eval_loss": [r["eval_loss"] for r in rows],
        "server_bytes_per_round": round(server), "rounds": len(rows),
        "n_updates": [r["n_updates"] for r in rows], "wall_s": round(time.perf_counter() - t0, 1)}
    if ratios:
        out["peer_sent_over_update"] = round(max(s for s, _ in ratios), 3)
        out["peer_received_over_update"] = round(max(g for _, g in ratios), 3)
    print(f"{topology} {n} peers: {server / 1e6:.2f} MB per round at "
          f"the server ({out['wall_s']} s)", file=sys.stderr, flush=True)
    return out


CHROMIUM = os.environ.get("DAA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-features=WebRtcHideLocalIpsWithMdns"]  # docs/pitfalls.md: no mDNS hosts


async def chromium_pairs(size: int, repeats: int) -> list[dict[str, Any]]:
    """Chromium -> aiortc and Chromium -> Chromium: browser/node/rtcbench.html (rtc.js
    chunking, the receiving page checks the digest; aiortc receives with FrameLink)."""
    from aiohttp import web
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from playwright.async_api import async_playwright

    from server import browser_assets
    from transport.rtc import FrameLink, rtc_config

    app = web.Application()
    app.add_routes(browser_assets.routes)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/static/node/rtcbench.html"
    rows: list[dict[str, Any]] = []

    def row(pair: str, i: int, dt: float) -> None:
        rows.append({"pair": pair, "run": i, "MB": size / 1e6, "seconds": round(dt, 3),
                     "MBps": round(size / 1e6 / dt, 2)})
        print(f"{pair} run {i}: {size / 1e6:.1f} MB in {dt:.2f} s", file=sys.stderr)

    async def opened(page: Any) -> None:
        for _ in range(200):
            if await page.evaluate("() => rtcBench.open()"):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("data channel did not open")

    pc = RTCPeerConnection(rtc_config())
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page()
            await page.goto(url)
            await page.wait_for_function("() => window.rtcBench")
            done: asyncio.Queue[tuple[bytes, float]] = asyncio.Queue()
            links: list[FrameLink] = []

            def on_channel(ch: Any) -> None:
                links.append(FrameLink(ch, on_frame=lambda f: done.put_nowait((f, time.time())),
                                       max_frame=size + 1024))

            pc.on("datachannel", on_channel)
            offer = await page.evaluate("() => rtcBench.offer()")
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            await page.evaluate("(sdp) => rtcBench.accept(sdp)", pc.localDescription.sdp)
            await opened(page)
            for i in range(repeats):
                start_ms = await page.evaluate("([n, t]) => rtcBench.send(n, t)", [size, i + 1])
                frame, at = await asyncio.wait_for(done.get(), timeout=300)
                assert len(frame) == size
                row("chromium-aiortc", i, at - start_ms / 1000)
            a, b = await browser.new_page(), await browser.new_page()
            for pg in (a, b):
                await pg.goto(url)
                await pg.wait_for_function("() => window.rtcBench")
            offer = await a.evaluate("() => rtcBench.offer()")
            answer = await b.evaluate("(sdp) => rtcBench.answer(sdp)", offer)
            await a.evaluate("(sdp) => rtcBench.accept(sdp)", answer)
            await opened(a)
            for i in range(repeats):
                start_ms = await a.evaluate("([n, t]) => rtcBench.send(n, t)", [size, i + 1])
                await b.wait_for_function(f"() => rtcBench.received().length > {i}",
                                          timeout=300_000, polling=20)
                got = (await b.evaluate("() => rtcBench.received()"))[i]
                assert got["ok"], got
                assert got["bytes"] == size, got
                row("chromium-chromium", i, (got["at"] - start_ms) / 1000)
            await browser.close()
    finally:
        await pc.close()
        await runner.cleanup()
    return rows


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=16.0, help="frame size in MB (10^6 bytes)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-chromium", action="store_true", help="aiortc <-> aiortc only")
    p.add_argument("--check-cancel", action="store_true",
                   help="also cancel a 16 MB transfer mid-way and check the channel recovers")
    p.add_argument("--peers", type=int, nargs="*", default=[4, 8, 16],
                   help="star vs p2p server bytes per round at these peer counts (none: skip)")
    p.add_argument("--flavour", default="micro", help="gpt-tiny flavour of the topology runs")
    p.add_argument("--topology-rounds", type=int, default=3)
    p.add_argument("--p2p-replicas", type=int, default=2, help="owners per shard in p2p")
    p.add_argument("--topologies", nargs="+", default=["star", "p2p"], choices=["star", "p2p"])
    p.add_argument("--p2p-result-codec", default="fp16", choices=["raw32", "fp16", "bf16"],
                   help="how p2p owners send reduced shards (run config p2p_result_codec)")
    p.add_argument("--quality", type=int, default=0, metavar="ROUNDS",
                   help="also: ROUNDS-round p2p runs (4 nodes, --quality-steps inner steps) "
                        "with each result codec, and their eval losses")
    p.add_argument("--quality-steps", type=int, default=20)
    p.add_argument("--stock-sctp", action="store_true",
                   help="aiortc's own SCTP code, without transport.sctp_tuning (before/after)")
    p.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(args_list)
    from transport import sctp_tuning

    if not args.stock_sctp:
        sctp_tuning.install()
    if args.receiver:
        evloop.run(receiver_process())
        return 0
    if not netns.inside():
        why = netns.available()
        if why is not None:
            print(f"error: this bench needs a private network namespace: {why}",
                  file=sys.stderr)
            return 2
        return netns.rerun_inside("bench.transport", args_list)
    size = int(args.mb * 1e6)
    rows = evloop.run(aiortc_pair(size, args.repeats, check_cancel=args.check_cancel))
    rows += evloop.run(aiortc_processes(size, args.repeats, stock=args.stock_sctp))
    browser_note = None
    if args.no_chromium or not os.path.exists(CHROMIUM):
        browser_note = "Chromium pairings skipped (--no-chromium or no Chromium)"
    else:
        rows += evloop.run(chromium_pairs(size, args.repeats))
    print_table(rows, ["pair", "run", "MB", "seconds", "MBps"])
    topo: list[dict[str, Any]] = []
    if args.peers:
        tmp = Path(tempfile.mkdtemp(prefix="daa-topology-"))
        for topology in args.topologies:
            for n in args.peers:
                topo.append(topology_run(tmp / f"{topology}-{n}", topology, n,
                                         rounds=args.topology_rounds, flavour=args.flavour,
                                         replicas=args.p2p_replicas,
                                         result_codec=args.p2p_result_codec))
        print()
        print_table(topo, ["topology", "peers", "replicas", "server_bytes_per_round",
                           "peer_sent_over_update", "peer_received_over_update", "n_updates",
                           "wall_s"])

    quality = {}
    if args.quality:
        tmp = Path(tempfile.mkdtemp(prefix="daa-quality-"))
        for codec in ("raw32", "fp16", "bf16"):
            q = topology_run(tmp / codec, "p2p", 4, rounds=args.quality, flavour=args.flavour,
                             replicas=args.p2p_replicas, result_codec=codec,
                             inner_steps=args.quality_steps)
            quality[codec] = q["eval_loss"]
        print()
        print_table([{"result_codec": c, "eval_loss_first": round(v[0], 4),
                      "eval_loss_last": round(v[-1], 4),
                      "vs_raw32": f"{(v[-1] / quality['raw32'][-1] - 1) * 100:+.3f}%"}
                     for c, v in quality.items()],
                    ["result_codec", "eval_loss_first", "eval_loss_last", "vs_raw32"])

    def by(topology: str) -> dict[str, int]:
        return {str(t["peers"]): t["server_bytes_per_round"] for t in topo
                if t["topology"] == topology}

    p2p_rows = [t for t in topo if t["topology"] == "p2p"]
    peer_ratio = max((max(t.get("peer_sent_over_update", 0), t.get("peer_received_over_update",
                                                                     0)) for t in p2p_rows),
                     default=None)

    def med(pair: str) -> float | None:
        vals = [r["MBps"] for r in rows if r["pair"] == pair]
        return round(statistics.median(vals), 2) if vals else None

    emit({"MBps": {"aiortc-aiortc": med("aiortc-aiortc (2 processes)"),
                   "aiortc-aiortc-1process": med("aiortc-aiortc"),
                   "aiortc-chromium": med("chromium-aiortc"),
                   "chromium-chromium": med("chromium-chromium")},
          "aiortc_chromium_direction": "Chromium sends, aiortc receives (a tab's update)",
          "frame_mb": args.mb, "repeats": args.repeats,
          "sctp": "aiortc stock" if args.stock_sctp else "aiortc + transport.sctp_tuning",
          "event_loop": evloop.name(),
          "server_bytes_per_round": {"star": by("star"), "p2p": by("p2p")} if topo else None,
          "p2p_16_over_4": (round(by("p2p")["16"] / by("p2p")["4"], 3)
                            if {"4", "16"} <= set(by("p2p")) else None),
          "peer_bytes_over_update": peer_ratio,
          "topology_model": f"gpt-tiny {args.flavour}",
          "p2p_result_codec": args.p2p_result_codec,
          **({"quality_eval_loss": {c: round(v[-1], 5) for c, v in quality.items()},
              "quality_setup": f"p2p, 4 nodes, {args.quality} rounds x {args.quality_steps} "
                               f"inner steps"} if quality else {}),
          **({"not_measured": browser_note} if browser_note else {})})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
