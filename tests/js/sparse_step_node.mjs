// Runs browser/node/sparse_step.js and codec_int2.js under Node.js for tests/test_sparse_tab.py:
// reads shared/testdata/sparse_step.json (path in argv[2]) and prints JSON
// {int2: [{name, payload, decoded}], steps: [{name, thetas: [hex]}], invalid: [{name, error,
// untouched}], merge: [hex]}: what the tab computes, for the Python test to compare with the
// golden bytes (merge: overlap's theta + (local - start), browser/node/ahead.js).

import { readFileSync } from 'node:fs';
import { encode, decodePayload } from '../../browser/node/codecs.js';
import { sparseStep } from '../../browser/node/sparse_step.js';
import { mergeParams } from '../../browser/node/ahead.js';

const hex = (u8) => Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength).toString('hex');
const bytes = (h) => new Uint8Array(Buffer.from(h, 'hex'));
const f32 = (h) => new Float32Array(bytes(h).buffer);

const doc = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const out = { int2: [], steps: [], invalid: [], merge: [] };
for (const c of doc.int2) {
  const x = f32(c.input_hex);
  const payload = encode('topk', x, { fraction: 1.0, values: 'int2', block: c.block });
  out.int2.push({ name: c.name, payload: hex(payload),
    decoded: hex(decodePayload(bytes(c.payload_hex), x.length)) });
}
for (const c of doc.steps) {
  let theta = bytes(c.theta_hex);
  const thetas = [];
  for (const p of c.payloads_hex) {
    theta = sparseStep(theta, bytes(p));
    thetas.push(hex(theta));
  }
  out.steps.push({ name: c.name, thetas });
}
for (const c of doc.invalid) {
  const theta = new Uint8Array(4 * c.n).fill(7);
  let error = null;
  try { sparseStep(theta, bytes(c.payload_hex)); } catch (err) { error = `${err.name}: ${err.message}`; }
  out.invalid.push({ name: c.name, error, untouched: theta.every((b) => b === 7) });
}
for (const c of doc.merge || []) {  // overlap's merge (ahead.js) vs shared.overlap.merge
  out.merge.push(hex(mergeParams(f32(c.theta), f32(c.local), f32(c.start))));
}
process.stdout.write(JSON.stringify(out));
