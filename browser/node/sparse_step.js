// SparseLoCo's outer step in the tab (shared/sparseloco.py): a "sparse" RoundOpen carries the
// server's sparse step u instead of the params, and the tab computes theta_r from the
// theta_{r-1} it holds with the float32 operations numpy's apply_sparse runs:
//
//   theta_r = copy(theta_{r-1});  theta_r[idx] -= f32(f32(lr) * vals)
//
// Each product and difference is taken in float64 and rounded once to float32 (Math.fround or
// the Float32Array store): exact for * and -, since 53 >= 2 * 24 + 2 bits. Off the indices the
// bytes are copied, so they stay those of theta_{r-1}. The caller (daa_glue.py, through
// shared.platform's sparse stepper) checks the result's SHA-256 against the RoundOpen's
// params_digest; a mismatch drops the params and reconnects for the full ones (a resync).
// tests/js/sparse_step_node.mjs checks this file against shared/testdata/sparse_step.json.
//
// Payload (little-endian): b"DL" | u8 3 | f64 lr | a topk codec payload of n values.
//
//   const next = sparseStep(thetaU8, payloadU8);  // a new Uint8Array; BadUpdate if malformed

import { bad } from './codec_base.js';
import { decodeTopkSparse, WIRE_IDS } from './codecs.js';

export const VERSION = 3;
const HEAD = 11;  // "DL", version, f64 lr

/** Whether `payload` (a Uint8Array) is a sparse-step payload (by its magic and version). */
export function isSparseStep(payload) {
  return payload.length > HEAD && payload[0] === 0x44 && payload[1] === 0x4c && payload[2] === VERSION;
}

/** {lr, idx (ascending), vals (Float32Array)} of the step for n params; BadUpdate if malformed. */
export function decodeSparseStep(payload, n) {
  if (!isSparseStep(payload)) throw bad('not a sparse-step payload');
  const lr = new DataView(payload.buffer, payload.byteOffset + 3, 8).getFloat64(0, true);
  if (!(Number.isFinite(lr) && lr > 0)) throw bad(`sparse step: lr ${lr}`);
  const body = payload.subarray(HEAD);
  if (body[0] !== WIRE_IDS.topk) throw bad('sparse step: the step is not a topk payload');
  const { idx, vals } = decodeTopkSparse(body, n);
  return { lr, idx, vals };
}

/** theta[idx] -= f32(f32(lr) * vals), in place on the Float32Array `theta`. */
export function applySparse(theta, idx, vals, lr) {
  const lrf = Math.fround(lr);
  const fr = Math.fround;
  for (let j = 0; j < idx.length; j++) {
    const i = idx[j];
    theta[i] = theta[i] - fr(lrf * vals[j]);  // the store rounds the difference to float32
  }
  return theta;
}

/** theta_r (float32 LE bytes, a new Uint8Array) from theta_{r-1}'s bytes and a sparse-step
 * payload; the payload is decoded before anything is written. */
export function sparseStep(thetaU8, payload) {
  if (thetaU8.byteLength % 4) throw bad(`params of ${thetaU8.byteLength} bytes are not float32 values`, 'length');
  const { lr, idx, vals } = decodeSparseStep(payload, thetaU8.byteLength >> 2);
  const out = thetaU8.slice();  // its own aligned buffer
  applySparse(new Float32Array(out.buffer, 0, out.byteLength >> 2), idx, vals, lr);
  return out;
}
