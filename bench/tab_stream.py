"""A tab's streamed updates: how long each upload takes and how many chunk frames the tab
queues, over its WebSocket and over its `star` data channel.

    python -m bench.tab_stream                      # llama 2m (6.78 MB raw32 updates), 1 MB chunks
    python -m bench.tab_stream --model gpt-tiny --flavour "" --chunk-mb 0.05 --rounds 1

For each path (`ws`: a `transport ws` run; `rtc`: a `transport star` run, the tab's channel
to the server's aiortc peer) a real server (`python -m server`, stream_chunk_mb, quorum 1,
one inner step a round, raw32) and one Chromium tab (`/?backend=wasm`) that trains the
rounds. The tab sends its chunks one at a time, each once the path's buffer holds less than
a chunk (browser/node/stream_pump.js); its own counters (stats.stream) give, per update, the
milliseconds from its StreamSubmit to the server's Ack (the tab's clock: the server's check,
spooling and intake of the update included), and the most chunk frames and bytes that ever
sat in the path's buffer right after a send. /api/run's `stream` says which path the frames
took; `transport` is the tab's line once the run is finished ("relay" in a star run: the
run's end closed its channel). The machine is shared with other jobs: times are loose.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import emit, get_json, print_table
from bench.live import running_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
PATHS = {"ws": "ws", "rtc": "star"}  # path -> the run's transport


def run_path(browser: Any, work: Path, path: str, args: argparse.Namespace) -> dict[str, Any]:
    flags = ["--model", args.model, "--transport", PATHS[path], "--rounds", str(args.rounds),
             "--quorum", "1", "--inner-steps", "1", "--batch-size", str(args.batch_size),
             "--codec", "raw32", "--stream-chunk-mb", str(args.chunk_mb),
             "--max-frame-mb", "64", "--deadline-s", "600", "--log-level", "WARNING"]
    if args.flavour:
        flags += ["--flavour", args.flavour]
    work.mkdir(parents=True)
    with running_server(work, *flags) as (base, _proc):
        ctx = browser.new_context()
        try:
            page = ctx.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{base}/?backend=wasm")
            page.wait_for_function(
                "() => { const s = window.daaNode && window.daaNode.stats; "
                "if (s && s.state === 'stopped') throw new Error(s.errors.join('; ')); "
                "return !!s && s.state === 'the run is finished'; }",
                timeout=args.timeout_s * 1000, polling=500)
            s = page.evaluate("() => window.daaNode.stats")
        finally:
            ctx.close()
        run = get_json(base + "/api/run")
    st, view = s["stream"], run["stream"]
    uploads = st["uploads"]
    size = uploads[0]["bytes"] if uploads else 0
    ms = [u["ms"] for u in uploads]
    med = statistics.median(ms) if ms else 0.0
    chunk = int(args.chunk_mb * 2**20)
    return {"path": path, "update_mb": round(size / 1e6, 2), "chunks": -(-size // chunk),
            "uploads": len(uploads), "accepted": s["accepted"],
            "upload_ms": round(med, 1), "upload_ms_all": [round(v, 1) for v in ms],
            "MBps": round(size / 1e6 / (med / 1000), 2) if med else 0.0,
            "max_queued_frames": st["maxQueuedFrames"],
            "max_queued_mb": round(st["maxQueuedBytes"] / 1e6, 3),
            "chunks_ws": view["chunks_ws"], "chunks_rtc": view["chunks_rtc"],
            "submits_ws": view["submits_ws"], "submits_rtc": view["submits_rtc"],
            "transport": s["transport"], "console_errors": errors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tab_stream", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama")
    ap.add_argument("--flavour", default="2m")
    ap.add_argument("--chunk-mb", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--paths", default="ws,rtc")
    ap.add_argument("--timeout-s", type=float, default=480.0)
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    rows = []
    with tempfile.TemporaryDirectory(prefix="tab-stream-") as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            for path in args.paths.split(","):
                rows.append(run_path(browser, Path(tmp) / path, path, args))
        finally:
            browser.close()
    name = f"{args.model}{'-' + args.flavour if args.flavour else ''}"
    print(f"{name}, {args.chunk_mb} MB chunks, {args.rounds} rounds, one tab (Chromium, wasm); "
          "upload_ms: median of the tab's StreamSubmit -> Ack; shared machine, loose")
    print_table(rows, ["path", "update_mb", "chunks", "uploads", "upload_ms", "MBps",
                       "max_queued_frames", "max_queued_mb", "chunks_ws", "chunks_rtc",
                       "transport"])
    emit({"bench": "tab_stream", "model": name, "chunk_mb": args.chunk_mb,
          "rounds": args.rounds, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
