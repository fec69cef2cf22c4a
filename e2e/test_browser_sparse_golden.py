"""SparseLoCo's step and the 2-bit codec in real Chromium: the page imports the tab's own
modules (/static/node/sparse_step.js, codecs.js, ahead.js) and runs them on the golden vectors
the server serves (/pkg/testdata/sparse_step.json, from shared/testdata/make_sparse_golden.py):
every chain of steps ends on the server's bytes, every 2-bit payload is encoded and decoded as
numpy does, and every malformed payload is refused before the params are touched (the same
checks as tests/test_sparse_tab.py under Node.js)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GOLDEN = json.loads((Path(__file__).resolve().parent.parent / "shared" / "testdata"
                     / "sparse_step.json").read_text(encoding="utf-8"))

RUN_GOLDEN = """async () => {
  const { sparseStep } = await import('/static/node/sparse_step.js');
  const { encode, decodePayload } = await import('/static/node/codecs.js');
  const doc = await (await fetch('/pkg/testdata/sparse_step.json')).json();
  const bytes = (h) => new Uint8Array(h.match(/../g).map((b) => parseInt(b, 16)));
  const hex = (u8) => Array.from(u8, (b) => b.toString(16).padStart(2, '0')).join('');
  const u8 = (f) => new Uint8Array(f.buffer, f.byteOffset, f.byteLength);
  const out = { int2: [], steps: [], invalid: [] };
  for (const c of doc.int2) {
    const x = new Float32Array(bytes(c.input_hex).buffer);
    out.int2.push([hex(encode('topk', x, { fraction: 1.0, values: 'int2', block: c.block })),
      hex(u8(decodePayload(bytes(c.payload_hex), x.length)))]);
  }
  for (const c of doc.steps) {
    let theta = bytes(c.theta_hex);
    const thetas = [];
    for (const p of c.payloads_hex) {
      theta = sparseStep(theta, bytes(p));
      thetas.push(hex(theta));
    }
    out.steps.push(thetas);
  }
  for (const c of doc.invalid) {
    const theta = new Uint8Array(4 * c.n).fill(7);
    let error = null;
    try { sparseStep(theta, bytes(c.payload_hex)); } catch (err) { error = err.name; }
    out.invalid.push([error, theta.every((b) => b === 7)]);
  }
  return out;
}"""


def test_golden_sparse_steps_in_chromium(browser: Any, live_server: Any) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{live_server.url}/pkg/testdata/sparse_step.json")
        got = page.evaluate(RUN_GOLDEN)
    finally:
        context.close()
    assert got["int2"] == [[c["payload_hex"], c["decoded_hex"]] for c in GOLDEN["int2"]]
    assert got["steps"] == [c["thetas_hex"] for c in GOLDEN["steps"]]
    assert got["invalid"] == [["BadUpdate", True]] * len(GOLDEN["invalid"])
