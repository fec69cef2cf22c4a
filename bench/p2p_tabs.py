"""Browser tabs as full members of a `p2p` run, and what the server moves per round.

    python -m bench.p2p_tabs [--native 2] [--tabs 4] [--rounds 4] [--model gpt-tiny]
                             [--close-tab] [--cap N] [--no-native-only]

Inside a private network namespace the bench creates (bench.netns: loopback plus one veth,
every packet stays inside it; Chromium finds no usable WebRTC candidate on loopback alone):

1. A real server (`--transport p2p`, median, fp16 results), `--native` real native nodes and
   `--tabs` headless Chromium tabs (one browser context each: its own identity) train
   `--rounds` rounds together. Tabs open direct data channels to the plan's members
   (browser/node/mesh.js), send their slices, reduce the shards they own in the participant
   worker (p2p_kernels.js), serve results, and apply the outer step themselves.
2. The same number of members, all native (`server_bytes_per_round_native_only`).

Server bytes per round are the server's own counters (/api/rounds bytes in + out), averaged
over the rounds after the first (round 0 carries the start-up: full params + momentum, channel
set-up). A tab's bytes are its ShardReducer's shard bytes (sent, received) over its update
size, the worst tab and round after the first; `tab_reduce_ms` is the median time of the JS
kernel (reduce + encode one owned shard, in the worker, crossings from Pyodide included).

`--close-tab` (e2e/test_browser_p2p.py): once round 2 opened, one tab holds its shard traffic
(node.p2pHold) and is closed once it holds the round's plan, i.e. mid-reduction; the JSON then
says what the server did (p2p_dropped, n_updates per round). `--lie-tab`: the last tab's
reduced shards of round 1 are wrong (fault injection); the JSON lists its p2p_mismatch
records.

Last line: JSON with native, tabs, rounds_committed, server_bytes_per_round,
server_bytes_per_round_native_only, peer_bytes_over_update_tab, tab_reduce_ms, and more.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import netns
from bench.common import children, emit, free_port, get_json, poll, print_table
from bench.transport import CHROMIUM, CHROMIUM_ARGS, topology_run

STATS = "() => window.daaNode ? window.daaNode.stats : null"


def server_args(port: int, data: Path, members: int, rounds: int, model: str,
                rtc_timeout_s: float = 20.0, groups: int = 0) -> list[str]:
    return ["-m", "server", "--data-dir", str(data), "--port", str(port), "--model", model,
            "--inner-steps", "4", "--batch-size", "8", "--quorum", str(members), "--rounds",
            str(rounds), "--deadline-s", "120", "--transport", "p2p", "--aggregator", "median",
            "--rtc-timeout-s", str(rtc_timeout_s), "--p2p-timeout-s", "60", "--p2p-replicas", "2",
            "--p2p-result-codec", "fp16", "--log-level", "INFO",
            *(["--p2p-groups", str(groups)] if groups else [])]


def steady_bytes(rows: list[dict[str, Any]]) -> float:
    steady = [r for r in rows if r["round"] >= 1] or rows
    return statistics.fmean(r["bytes_up"] + r["bytes_down"] for r in steady)


def mixed_run(tmp: Path, *, natives: int, tabs: int, rounds: int, model: str,
              close_tab: bool = False, lie_tab: bool = False, rtc_timeout_s: float = 20.0,
              tab_cap: int | None = None, groups: int = 0) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    members = natives + tabs
    quorum = members - 1 if close_tab else members
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    with children(tmp) as spawn:
        spawn("server", *server_args(port, tmp / "run", quorum, rounds, model, rtc_timeout_s,
                                     groups))
        poll(lambda: get_json(url + "/api/run"), 120, "the server")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            pages, errors, logs = [], [], []  # logs: every console line of each tab
            for i in range(tabs):
                page = browser.new_context().new_page()
                tab_log = (tmp / f"tab{i}.log").open("a", encoding="utf-8")
                logs.append(tab_log)

                def console(m: Any, i: int = i, log: Any = tab_log) -> None:
                    log.write(f"{time.strftime('%H:%M:%S')} {m.type}: {m.text}\n")
                    log.flush()
                    if m.type == "error":
                        errors.append(f"tab{i}: {m.text}")

                page.on("console", console)
                page.goto(f"{url}/?backend=wasm"
                          + ("" if tab_cap is None else f"&p2p_cap={tab_cap}"))
                pages.append(page)
            for page in pages:  # every tab welcomed before the native nodes start, so that
                # the first round waits for all members (it opens at quorum)
                page.wait_for_function("() => window.daaNode && window.daaNode.stats.runId",
                                       timeout=300_000, polling=200)
            liar = None
            if lie_tab:  # the last tab's reduced shards of round 1 are wrong
                liar = pages[-1].evaluate("() => window.daaNode.participant('lie', [1])"
                                          ".then(() => window.daaNode.stats.nodeId)")
            for i in range(natives):
                spawn(f"node{i}", "-m", "native_node", "join", "--coordinator",
                      f"127.0.0.1:{port}", "--name", f"node{i}", "--state-dir",
                      str(tmp / f"node{i}"), "--threads", "1", "--quiet")
            closed: dict[str, Any] = {}
            if close_tab:  # once round 2 opened for it (every member is in by then, and
                # round 1's reduction, disputes included, is over)
                victim = pages[0]
                victim.wait_for_function("() => { const s = window.daaNode && window.daaNode.stats;"
                                         " return s && s.p2p && s.round >= 2; }",
                                         timeout=300_000, polling=100)
                victim.evaluate("() => { window.daaNode.p2pHold = true; }")
                victim.wait_for_function("() => (window.daaNode.held || []).length > 0",
                                         timeout=300_000, polling=100)
                closed = {"node_id": victim.evaluate("() => window.daaNode.stats.nodeId"),
                          "held_frames": victim.evaluate("() => window.daaNode.held.length"),
                          "state": victim.evaluate("() => window.daaNode.stats.state")}
                closed["round"] = int(closed["state"].rsplit(" ", 1)[-1])  # reducing round N
                victim.context.close()
                pages = pages[1:]
            poll(lambda: len(get_json(url + "/api/rounds")) >= rounds, 900,
                 f"{rounds} rounds with {natives} native nodes and {tabs} tabs (logs in {tmp})")
            stats = [p.evaluate(STATS) for p in pages]
            browser.close()
            for f in logs:
                f.close()
        rows = get_json(url + "/api/rounds")
        metrics = get_json(url + "/api/run")
        rejections = get_json(url + "/api/rejections")
    tab_rounds = [s.get("p2p") or {} for s in stats]
    ratios = []
    for p in tab_rounds:
        if p.get("update"):
            ratios.append(max(p["bytes_out"], p["bytes_in"]) / p["update"])
    reduce_ms = [ms for p in tab_rounds for ms in p.get("reduce_ms", [])]
    out = {"natives": natives, "tabs": tabs, "rounds_committed": len(rows),
           "n_updates": [r["n_updates"] for r in rows],
           "eval_loss": [r["eval_loss"] for r in rows],
           "server_bytes_per_round": round(steady_bytes(rows)),
           "peer_bytes_over_update_tab": round(max(ratios), 3) if ratios else None,
           "tab_reduce_ms": round(statistics.median(reduce_ms), 2) if reduce_ms else None,
           "tab_outer_steps": [p.get("outer_steps") for p in tab_rounds],
           "tab_resyncs": [p.get("resyncs") for p in tab_rounds],
           "tab_links": [p.get("links") for p in tab_rounds],
           "tab_groups": [p.get("group") for p in tab_rounds],  # grouped runs (--groups)
           "tab_relayed_bytes": [p.get("relayed") for p in tab_rounds],
           "tab_direct_bytes": [p.get("direct") for p in tab_rounds],
           "tab_transport": [s.get("transport") for s in stats],
           "closed_tab": closed or None, "console_errors": errors[:10],
           "lying_tab": None if liar is None else {
               "node_id": liar, "outvoted_shards": sorted(
                   (r["round"], r["reason"]) for r in rejections
                   if r["node_id"] == liar and r["code"] == "p2p_mismatch")},
           "server_counters": metrics.get("p2p") or {},  # the server's p2p_* counters
           "wall_s": round(time.perf_counter() - t0, 1)}
    print(f"mixed: {natives} native + {tabs} tabs: {out['server_bytes_per_round'] / 1e6:.3f} MB"
          f" per round at the server ({out['wall_s']} s)", file=sys.stderr, flush=True)
    return out


LIMITS_JS = """async ({ ks, mb }) => {
  const gathered = (pc) => new Promise((r) => {
    if (pc.iceGatheringState === 'complete') r();
    pc.addEventListener('icegatheringstatechange',
      () => pc.iceGatheringState === 'complete' && r());
    setTimeout(r, 3000);
  });
  const pairs = [];
  const rows = [];
  for (const k of ks) {
    const t0 = performance.now();
    const opening = [];
    while (pairs.length + opening.length < k) {
      const a = new RTCPeerConnection(); const b = new RTCPeerConnection();
      const ch = a.createDataChannel('x', { ordered: true });
      const got = new Promise((r) => { b.ondatachannel = (ev) => r(ev.channel); });
      const open = new Promise((r) => { ch.onopen = r; });
      await a.setLocalDescription(await a.createOffer()); await gathered(a);
      await b.setRemoteDescription(a.localDescription);
      await b.setLocalDescription(await b.createAnswer()); await gathered(b);
      await a.setRemoteDescription(b.localDescription);
      opening.push(Promise.all([open, got]).then(([, rc]) => ({ a, b, ch, rc })));
    }
    pairs.push(...(await Promise.all(opening)));
    const openMs = performance.now() - t0;
    const size = mb * 1024 * 1024; const chunk = new Uint8Array(256 * 1024 - 64);
    const t1 = performance.now();
    await Promise.all(pairs.map(({ ch, rc }) => new Promise((resolve) => {
      let got = 0; rc.binaryType = 'arraybuffer';
      rc.onmessage = (ev) => { got += ev.data.byteLength; if (got >= size) resolve(); };
      ch.bufferedAmountLowThreshold = 1 << 20;
      let sent = 0;
      const pump = () => {
        while (sent < size && ch.bufferedAmount < (4 << 20)) {
          ch.send(chunk); sent += chunk.length;
        }
        if (sent < size) ch.addEventListener('bufferedamountlow', pump, { once: true });
      };
      pump();
    })));
    const s = (performance.now() - t1) / 1000;
    rows.push({ connections: 2 * pairs.length, open_ms: Math.round(openMs),
      mb_per_channel: mb, aggregate_MBps: +((pairs.length * size) / 1e6 / s).toFixed(2) });
  }
  // how much one channel buffers before send() throws (Chromium's send queue)
  const { ch } = pairs[0];
  let buffered = 0;
  try { for (;;) { ch.send(new Uint8Array(256 * 1024 - 64)); buffered = ch.bufferedAmount; } }
  catch (err) { buffered = ch.bufferedAmount; }
  for (const p of pairs) { p.a.close(); p.b.close(); }
  return { rows, max_buffered_bytes: buffered };
}"""


def tab_limits(ks: list[int], mb: int) -> dict[str, Any]:
    """In one headless Chromium page: open k loopback-veth pairs of RTCPeerConnections (2k
    connections in the tab), then move `mb` MiB over every channel at once; and how many bytes
    one channel buffers before send() throws."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        out: dict[str, Any] = page.evaluate(LIMITS_JS, {"ks": ks, "mb": mb})
        browser.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--native", type=int, default=2)
    ap.add_argument("--tabs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--model", default="gpt-tiny")
    ap.add_argument("--close-tab", action="store_true")
    ap.add_argument("--lie-tab", action="store_true")
    ap.add_argument("--tab-cap", type=int, help="each tab's cap on direct channels (p2p_cap)")
    ap.add_argument("--rtc-timeout-s", type=float, default=20.0,
                    help="how long a peer waits for a direct channel before relaying")
    ap.add_argument("--groups", type=int, default=0, help="the server's --p2p-groups")
    ap.add_argument("--no-native-only", action="store_true")
    ap.add_argument("--dir", help="keep logs here (default: a temporary directory)")
    ap.add_argument("--limits", type=int, nargs="*", default=[2, 4, 8, 16, 32],
                    help="peer-connection pairs in one tab to measure (none: skip)")
    ap.add_argument("--limits-mb", type=int, default=4, help="MiB per channel, at once")
    args = ap.parse_args(argv)
    if not netns.inside():
        why = netns.available()
        if why is not None:
            print(f"bench.p2p_tabs needs a private network namespace: {why}", file=sys.stderr)
            return 2
        return netns.rerun_inside("bench.p2p_tabs", sys.argv[1:] if argv is None else argv)
    limits = tab_limits(args.limits, args.limits_mb) if args.limits else None
    if limits is not None:
        print_table(limits["rows"], ["connections", "open_ms", "mb_per_channel",
                                     "aggregate_MBps"])
        print(f"one channel buffers {limits['max_buffered_bytes']:,} bytes before send() "
              "throws", flush=True)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(args.dir) if args.dir else Path(td)
        mixed = mixed_run(tmp / "mixed", natives=args.native, tabs=args.tabs,
                          rounds=args.rounds, model=args.model, close_tab=args.close_tab,
                          lie_tab=args.lie_tab, rtc_timeout_s=args.rtc_timeout_s,
                          tab_cap=args.tab_cap, groups=args.groups)
        native_only = None
        if not args.no_native_only:
            n = args.native + args.tabs
            native_only = topology_run(tmp / "native", "p2p", n, rounds=args.rounds,
                                       flavour="nano", replicas=2, result_codec="fp16")
    rows = [{"run": "mixed", "members": args.native + args.tabs,
             "server_bytes_per_round": mixed["server_bytes_per_round"],
             "rounds": mixed["rounds_committed"]}]
    if native_only is not None:
        rows.append({"run": "native only", "members": args.native + args.tabs,
                     "server_bytes_per_round": native_only["server_bytes_per_round"],
                     "rounds": native_only["rounds"]})
    print_table(rows, ["run", "members", "server_bytes_per_round", "rounds"])
    figures = {"native": args.native, "tabs": args.tabs, "model": args.model,
               **{k: v for k, v in mixed.items() if k not in ("natives", "tabs")},
               "server_bytes_per_round_native_only":
                   native_only["server_bytes_per_round"] if native_only else None,
               "tab_limits": limits}
    if native_only:
        figures["server_ratio_vs_native_only"] = round(
            mixed["server_bytes_per_round"] / native_only["server_bytes_per_round"], 3)
    emit(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
