"""Inside a private network namespace (bench.netns; run by test_browser_rtc.py): a tab and a
native node send their updates to the server's aiortc peer over WebRTC data channels.

    python -m e2e.netns_star DATA_DIR [--onnx-cache DIR] [--expect webrtc|relay]

Chromium needs a non-loopback interface for WebRTC (docs/pitfalls.md): the namespace has the veth
10.77.0.1, and every packet stays inside it. Prints one JSON line with what it saw and exits
0 when the tab's and the native node's updates went the expected way and the run finished.
`--expect relay` is for a namespace with loopback only: ICE cannot connect, so after
rtc_timeout_s (2 s then) both relay their updates over the WebSocket.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import free_port
from e2e.conftest import CHROMIUM, CHROMIUM_ARGS, ROOT

FLAGS = ["--model", "gpt-tiny", "--inner-steps", "8", "--batch-size", "16", "--quorum", "2",
         "--rounds", "3", "--deadline-s", "60", "--transport", "star"]


def api(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def main(argv: list[str]) -> int:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--onnx-cache")
    ap.add_argument("--expect", choices=("webrtc", "relay"), default="webrtc")
    args = ap.parse_args(argv)
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    if args.onnx_cache:
        (data / "onnx").symlink_to(Path(args.onnx_cache), target_is_directory=True)
    timeout = "20" if args.expect == "webrtc" else "2"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs = [subprocess.Popen([sys.executable, "-m", "server", "--data-dir", str(data / "run"),
                               "--port", str(port), *FLAGS, "--rtc-timeout-s", timeout],
                              cwd=ROOT,
                              stdout=(data / "server.log").open("wb"), stderr=subprocess.STDOUT)]
    out: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                api(f"{base}/api/run")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "native_node", "join", "--coordinator", f"127.0.0.1:{port}",
             "--state-dir", str(data / "native"), "--quiet", "--threads", "1"], cwd=ROOT,
            stdout=(data / "native.log").open("wb"), stderr=subprocess.STDOUT))
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
                *CHROMIUM_ARGS, "--disable-features=WebRtcHideLocalIpsWithMdns"])
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{base}/?backend=wasm")
            page.wait_for_function("() => window.daaNode && window.daaNode.stats.accepted >= 2",
                                   timeout=240_000, polling=250)
            peers = api(f"{base}/api/peers")  # while both are connected
            mid = page.evaluate("() => window.daaNode.stats.transport")
            page.wait_for_function("() => window.daaNode && window.daaNode.stats.state === "
                                   "'the run is finished'", timeout=240_000, polling=250)
            stats = page.evaluate("() => window.daaNode.stats")
            browser.close()
        tab = next(p for p in peers if p["runtime"] == "browser")
        native = next(p for p in peers if p["runtime"] == "native")
        rounds = api(f"{base}/api/rounds")
        out = {"tab_transport": mid, "tab_transport_at_end": stats["transport"],
               "tab_updates_via": stats["updatesVia"],
               "tab_accepted": stats["accepted"],
               "server_view_tab": tab["transport"], "server_view_native": native["transport"],
               "tab_updates": tab["updates_accepted"], "rounds": len(rounds),
               "n_updates": [r["n_updates"] for r in rounds], "console_errors": errors}
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    print(json.dumps(out), flush=True)
    want = args.expect
    ok = (out.get("tab_updates_via", {}).get(want, 0) >= 2 and out.get("server_view_tab") == want
          and out.get("server_view_native") == want and out.get("rounds") == 3
          and out.get("tab_accepted") == 3 and out.get("n_updates") == [2, 2, 2]
          and not out.get("console_errors"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
