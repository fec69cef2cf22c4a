"""Secure aggregation in a real run: two tabs (Pyodide, the tab's ML-KEM-768 from
@noble/post-quantum) and a native node (pqcrypto) against the real server with `secagg` on.
One tab is closed right after its masked update was accepted, before the round unmasks; the
round still commits, with that tab's update in the sum, and the sum the server unmasked is
exactly the plain fixed-point sum of what the three participants masked (each keeps its own
fixed-point words: the tabs in the page, the native node in its state dir for this test).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from e2e.conftest import wait_until
from shared.outer import OuterConfig, outer_step

RUN = {"model": "mlp-digits", "inner_steps": 300, "batch_size": 32, "deadline_s": 120.0,
       "quorum": 3, "rounds": 1, "secagg": True, "secagg_clip": 1.0,
       "secagg_timeout_s": 30.0}
PLAIN_JS = """() => {
  const p = window.daaNode && window.daaNode.secaggPlain;
  if (!p) return null;
  let s = '';
  for (let i = 0; i < p.ring.length; i += 1) s += String.fromCharCode(p.ring[i]);
  return { round: p.round, b64: btoa(s) };
}"""


class HeldUplink:
    """The last tab's socket to the server, routed through the test (Playwright's
    route_web_socket): its Submit frames (msg_type 4) wait until `release`, a slow uplink, so
    the dropping tab is surely gone before the round's unmask request (on a loaded machine the
    last tab could otherwise submit first). Everything else passes at once. The sync API
    forwards frames only while the test is inside a Playwright call: wait on the tab."""

    def __init__(self) -> None:
        self.held: list[bytes] = []
        self.holding = True
        self.server: Any = None

    def route(self, ws: Any) -> None:
        self.server = ws.connect_to_server()
        ws.on_message(self.up)

    def up(self, msg: str | bytes) -> None:
        if (self.holding and isinstance(msg, bytes) and len(msg) > 5 and msg[:4] == b"DAAP"
                and msg[5] == 4):
            self.held.append(msg)
            return
        self.server.send(msg)

    def release(self) -> None:
        self.holding = False
        for msg in self.held:
            self.server.send(msg)


def api(server: Any, path: str) -> Any:
    with urllib.request.urlopen(f"{server.url}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def plain_of(tab: Any) -> bytes:
    got = tab.page.evaluate(PLAIN_JS)
    assert got is not None
    assert got["round"] == 0, got
    return base64.b64decode(got["b64"])


def test_two_tabs_and_a_native_node_sum_securely_with_a_tab_dropping_after_submitting(
        make_server: Any, native_node: Any, open_tab: Any, tmp_path: Path,
        monkeypatch: Any) -> None:
    monkeypatch.setenv("DAA_SECAGG_KEEP_PLAIN", "1")  # the native node keeps its words
    server = make_server(RUN)
    theta0, mom0 = server.call(lambda: (np.array(server.run.params), np.array(server.run.momentum)))
    native = native_node(server)  # starts while the first tab loads
    drops = open_tab(f"{server.url}/?backend=wasm", "drops")
    drops.wait("!!s.nodeId && s.round === 0", timeout_s=120)
    uplink = HeldUplink()
    stays = open_tab(f"{server.url}/?backend=wasm", "stays",  # submits last
                     before_load=lambda page: page.route_web_socket(re.compile(".*"),
                                                                    uplink.route))
    # the dropping tab trained first; its masked update goes once the key stages ran
    drops.wait("s.accepted >= 1", timeout_s=120)
    dropped_plain = plain_of(drops)
    drop_id = drops.stats()["nodeId"]
    drops.close()  # gone before the round's unmask request
    uplink.release()
    stays.wait("s.accepted >= 1", timeout_s=120)
    wait_until(lambda: api(server, "/api/run")["committed_rounds"] >= 1, 120, "round 0")
    stay_id = stays.stats()["nodeId"]
    stays_plain = plain_of(stays)
    native_plain = (native.log.parent / "secagg-plain-0.u32").read_bytes()

    last = api(server, "/api/run")["secagg"]["last"]
    assert last["round"] == 0
    assert len(last["contributors"]) == 3, last
    assert drop_id in last["contributors"], last
    assert drop_id not in last["responders"], last  # it dropped after submitting
    assert stay_id in last["responders"], last
    assert last["excluded"] == {}
    ring = np.zeros(len(theta0), dtype=np.uint32)
    for words in (dropped_plain, stays_plain, native_plain):
        ring += np.frombuffer(words, dtype="<u4")
    assert hashlib.sha256(ring.tobytes()).hexdigest() == last["sum_sha256"]
    mean = (ring.view(np.int32).astype(np.float64) / 2 ** last["frac_bits"] / 3
            ).astype(np.float32)
    cfg = server.run.config
    want, _ = outer_step(theta0, mean, mom0, OuterConfig(lr=cfg.outer_lr,
                                                         momentum=cfg.outer_momentum))
    got = server.call(lambda: np.array(server.run.params))
    assert np.array_equal(got, np.asarray(want))
    (row,) = api(server, "/api/rounds")
    assert row["n_updates"] == 3
    stays.wait("s.state === 'the run is finished'", timeout_s=60)
    s = stays.stats()
    assert s["accepted"] == 1, s
    assert s["rejected"] == 0, s
    assert stays.errors == [], stays.errors
    assert native.proc.wait(timeout=30) == 0
    stays.screenshot("secagg-tab-dropped")


TAB_MASK_JS = """async (n) => {
  const m = await import('/static/node/secagg.js');
  const doc = await (await fetch('/pkg/testdata/secagg.json', { cache: 'no-cache' })).json();
  const checks = m.checkSecagg(doc);
  const seed = new Uint8Array(32).map((_, i) => i + 1);
  let t = performance.now();
  const js = m.maskWords(seed, 0, n);
  const jsMs = performance.now() - t;
  const py = window.pyodide;
  py.globals.set('seed_js', seed);
  t = performance.now();
  const out = py.runPython(`
from shared.secagg.prg import mask, ring_bytes
ring_bytes(mask(bytes(seed_js.to_py()), 0, ${n}, use_numpy=False))`);
  const pyMs = performance.now() - t;
  const pyBytes = out.toJs();
  out.destroy();
  const jsBytes = new Uint8Array(js.buffer);
  const same = pyBytes.length === jsBytes.length && pyBytes.every((v, i) => v === jsBytes[i]);
  py.globals.set('vals_n', n);
  const masked = (useJs) => {
    const t0 = performance.now();
    const r = py.runPython(`
from array import array
from shared import platform
from shared.secagg.fixedpoint import FixedPoint
from shared.secagg.prg import add_mask, ring_bytes
y = FixedPoint.for_sum(1.0, 16).encode(array("f", [0.001 * (i % 997) for i in range(vals_n)]))
terms = [(bytes([i]) * 32, 1 if i % 2 else -1) for i in range(16)]  # 16 masks: k = 15
masker = platform.ring_masker()
if ${useJs}:
    out = masker.add_masks(ring_bytes(y), terms, 0)
else:
    for seed, sign in terms:
        add_mask(y, seed, 0, sign)
    out = ring_bytes(y)
out`);
    const ms = performance.now() - t0;
    const bytes = r.toJs();
    r.destroy();
    return [bytes, ms];
  };
  const [viaJs, maskMs] = masked('True');
  const [viaPy, maskPyMs] = masked('False');
  const maskSame = viaJs.length === viaPy.length && viaJs.every((v, i) => v === viaPy[i]);
  return { checks, same, jsMs, pyMs, maskMs, maskPyMs, maskSame };
}"""


def test_the_tab_expands_masks_bit_identically_in_js_and_pyodide(
        browser: Any, live_server: Any) -> None:
    """In Chromium: the JS PRG / KDF / masking pass the golden vectors; Python's SHAKE-128 in
    Pyodide gives the same 2^17 + 5 words (three blocks) as the JS PRG; and the tab's mask
    loop (shared.platform.ring_masker, JS) gives the same masked words as shared.secagg.prg's
    Python loop. Prints what each costs there."""
    context = browser.new_context()
    try:
        pg = context.new_page()
        pg.goto(f"{live_server.url}/static/node/selftest.html")
        pg.wait_for_function("() => window.__results && window.__results.status !== 'running'",
                             timeout=120_000)
        n = (1 << 17) + 5
        out = pg.evaluate(TAB_MASK_JS, n)
        assert [c for c in out["checks"] if not c["ok"]] == []
        assert len(out["checks"]) >= 9
        assert out["same"] is True
        assert out["maskSame"] is True  # the tab's JS mask loop == shared.secagg.prg's
        print(f"\n{n:,} mask words in Chromium: JS {out['jsMs']:.0f} ms, Pyodide "
              f"{out['pyMs']:.0f} ms; fixed point + 16 masks as the tab does it (JS loop) "
              f"{out['maskMs']:.0f} ms, all in Pyodide's Python {out['maskPyMs']:.0f} ms")
    finally:
        context.close()
