// Runs browser/node/p2p_kernels.js under Node.js for tests/test_p2p_tabs.py: reads JSON on
// stdin {reduce: [{rule, f, codec, slices: [hex]}], outer: [{theta, agg, m, lr, mu, nesterov}]}
// (bytes as hex: float32 LE, or u32 LE words for rule `secagg-sum`, the ring sum) and
// prints {reduce: [hex | {error}], outer: [{theta, m}]}.

import { readFileSync } from 'node:fs';
import { outerStep, reduceShard } from '../../browser/node/p2p_kernels.js';

const hex = (u8) => Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength).toString('hex');
const bytes = (h) => new Uint8Array(Buffer.from(h, 'hex'));

const input = JSON.parse(readFileSync(0, 'utf8'));
const out = { reduce: [], outer: [] };
for (const c of input.reduce || []) {
  try {
    out.reduce.push(hex(reduceShard(c.rule, c.f, c.codec, c.slices.map(bytes))));
  } catch (err) {
    out.reduce.push({ error: String(err.message || err) });
  }
}
for (const c of input.outer || []) {
  const r = outerStep(bytes(c.theta), bytes(c.agg), bytes(c.m), c.lr, c.mu, c.nesterov);
  out.outer.push({ theta: hex(r.theta), m: hex(r.m) });
}
process.stdout.write(JSON.stringify(out));
