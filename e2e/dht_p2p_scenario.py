"""Run inside a private network namespace by e2e/test_browser_dht.py (WebRTC needs an interface
besides loopback): a real `python -m server --dht --transport p2p`, a headless Chromium tab and
two real `python -m native_node join --dht` nodes train a p2p run; once the tab's data channels
to both nodes are open (the run's shard channels) and its DHT table holds them, the server
process is killed and the tab looks both nodes up again: over its data channels alone.
`python -m e2e.dht_p2p_scenario DIR`; prints JSON last."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import children, free_port, get_json, poll
from bench.p2p_tabs import server_args
from bench.transport import CHROMIUM, CHROMIUM_ARGS
from transport.identity import load_or_create_identity

NATIVES = 2
STATS = "() => window.daaNode ? window.daaNode.stats : null"


def wait(page: Any, cond: str, timeout_s: float) -> None:
    page.wait_for_function(f"() => {{ const s = window.daaNode && window.daaNode.stats; "
                           f"return !!s && ({cond}); }}", timeout=timeout_s * 1000, polling=200)


def lookups(page: Any, ids: list[str]) -> list[dict[str, Any]]:
    return [dict(page.evaluate("(id) => window.daaNode.dhtFind(id)", i)) for i in ids]


def scenario(tmp: Path) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ids = [load_or_create_identity(tmp / f"node{i}").node_id for i in range(NATIVES)]
    out: dict[str, Any] = {"natives": NATIVES}
    errors: list[str] = []
    with children(tmp) as spawn:
        server = spawn("server", *server_args(port, tmp / "run", NATIVES + 1, 50, "mlp-digits"),
                       "--dht")
        poll(lambda: get_json(url + "/api/run"), 120, "the server")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context().new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{url}/?backend=wasm")
            wait(page, "s.runId", 120)  # welcomed before the natives start: round 0 waits
            for i in range(NATIVES):
                spawn(f"node{i}", "-m", "native_node", "join", "--coordinator",
                      f"127.0.0.1:{port}", "--name", f"node{i}", "--state-dir",
                      str(tmp / f"node{i}"), "--threads", "1", "--quiet", "--dht")
            # a reduced round (the shard channels are open) and both nodes in the DHT table
            wait(page, f"s.p2p && s.p2p.rounds >= 1 && s.dht && s.dht.channels >= {NATIVES}"
                       f" && s.dht.contacts >= {NATIVES + 1}", 150)
            out["before"] = lookups(page, ids)
            wait(page, f"s.dht.lookups >= {NATIVES}", 10)  # the summary comes every second
            time.sleep(1.5)  # and the answers' traffic settles into it
            mark = page.evaluate(STATS)["dht"]
            out["console_errors_before_kill"] = list(errors)
            os.killpg(server.pid, signal.SIGKILL)  # the server goes away without notice
            server.wait(10)
            wait(page, "s.dht && !s.dht.relay_up", 30)
            t0 = time.monotonic()
            out["after"] = lookups(page, ids)
            out["after_s"] = round(time.monotonic() - t0, 2)
            wait(page, f"s.dht.lookups >= {2 * NATIVES}", 10)
            end = page.evaluate(STATS)["dht"]
            out["delta"] = {k: end[k] - mark[k] for k in ("lookups", "found", "direct_out",
                                                          "direct_in", "relay_out", "relay_in")}
            out["dht"] = end
            out["tab_p2p_links"] = page.evaluate(STATS)["p2p"].get("links")
            browser.close()
    out["console_errors"] = errors[:20]
    return out


def main() -> int:
    print(json.dumps(scenario(Path(sys.argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
