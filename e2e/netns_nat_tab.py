"""Inside a home namespace behind a NAT router (bench.netns.NatLab; run by
test_browser_nat.py): a Chromium tab opens the server's page over https, joins the run and
sends its updates over a WebRTC data channel set up with the Welcome's STUN/TURN servers.

    python -m e2e.netns_nat_tab URL --ca CA_PEM --spki HASH --rounds N

Chromium trusts the server's certificate through `--ignore-certificate-errors-spki-list`
(the SPKI hash of the test's throwaway certificate), so the page is a secure context as it
is with a real certificate. Prints one JSON line with what it saw.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.request
from typing import Any

from e2e.conftest import CHROMIUM, CHROMIUM_ARGS

CANDIDATES = """async () => {
  const up = window.daaNode && window.daaNode.uplink;
  if (!up) return null;
  const stats = await up.pc.getStats();
  const kinds = [];
  stats.forEach((r) => { if (r.type === 'local-candidate') kinds.push(r.candidateType); });
  return kinds;
}"""


def main(argv: list[str]) -> int:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--ca", required=True)
    ap.add_argument("--spki", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    ctx = ssl.create_default_context(cafile=args.ca)

    def api(path: str) -> Any:
        with urllib.request.urlopen(args.url.rstrip("/") + path, timeout=10,
                                    context=ctx) as resp:
            return json.loads(resp.read())

    out: dict[str, Any] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
            *CHROMIUM_ARGS, "--disable-features=WebRtcHideLocalIpsWithMdns",
            f"--ignore-certificate-errors-spki-list={args.spki}"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(f"{args.url}?backend=wasm")
        out["secure_context"] = page.evaluate("() => window.isSecureContext")
        out["cross_origin_isolated"] = page.evaluate("() => window.crossOriginIsolated")
        # while the run goes on (at its end the server closes the channel): how it is sent
        page.wait_for_function("() => window.daaNode && window.daaNode.stats.accepted >= 1",
                               timeout=240_000, polling=250)
        out["tab_transport"] = page.evaluate("() => window.daaNode.stats.transport")
        out["local_candidates"] = sorted(set(page.evaluate(CANDIDATES) or []))
        peers = api("/api/peers")
        tab = next(p for p in peers if p["runtime"] == "browser")
        out["server_view_tab"] = tab["transport"]
        out["ice_pairs"] = tab.get("ice_pairs", {})
        page.wait_for_function(f"() => window.daaNode.stats.accepted >= {args.rounds}",
                               timeout=240_000, polling=250)
        out["tab_accepted"] = page.evaluate("() => window.daaNode.stats.accepted")
        out["tab_updates_via"] = page.evaluate("() => window.daaNode.stats.updatesVia")
        out["rounds"] = api("/api/run")["committed_rounds"]
        out["console_errors"] = errors
        browser.close()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
