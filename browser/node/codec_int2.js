// 2-bit values for top-k (shared/codecs/int2.py; SparseLoCo's values): sign + one magnitude
// bit. The kept values are cut into blocks of `block`; each block sends two float32 levels
// (lo, hi) and one 2-bit code per value (bit 0: sign, 1 = negative; bit 1: 1 = hi), four codes
// a byte, the first value in the lowest bits, the last byte's pad bits 0.
//
// Encode, per block: m = mean |v| (float64); "hi" when |v| > m; lo / hi = the mean |v| of the
// lo / hi values (a level with no value is 0), each rounded to float32. The sums run in float64
// in value order, as numpy's bincount does for shared/codecs/int2.py's encode_np (its m comes
// from reduceat, whose pairwise sum may differ in m's last bit: a value would have to lie
// within that bit of m to get another code, and any encoding decodes the same everywhere).
// Decode gives exactly +-level (float32): the server, native nodes and tabs must agree on the
// decoded SparseLoCo step bit for bit (shared/testdata/sparse_step.json).
//
// Bytes: levels f32[2 * ceil(k / block)] | codes u8[ceil(k / 4)].

import { bad, ceilDiv, concat } from './codec_base.js';

/** Bytes of k values in blocks of `block`. */
export function int2Size(k, block) { return 8 * ceilDiv(k, block) + ceilDiv(k, 4); }

/** The k float32 values `vals` (finite) -> levels + codes (Uint8Array). */
export function int2Encode(vals, block) {
  const k = vals.length;
  const nb = ceilDiv(k, block);
  const levels = new Float32Array(2 * nb);
  const codes = new Uint8Array(ceilDiv(k, 4));
  for (let b = 0; b < nb; b++) {
    const lo = b * block;
    const hi = Math.min(k, lo + block);
    let all = 0;
    for (let i = lo; i < hi; i++) all += Math.abs(vals[i]);
    const m = all / (hi - lo);
    let nHi = 0;
    let sHi = 0;
    for (let i = lo; i < hi; i++) {
      const a = Math.abs(vals[i]);
      const isHi = a > m;
      if (isHi) { nHi++; sHi += a; }
      const code = (isHi ? 2 : 0) | (vals[i] < 0 ? 1 : 0);
      codes[i >> 2] |= code << (2 * (i & 3));
    }
    const nLo = hi - lo - nHi;
    levels[2 * b] = nLo > 0 ? (all - sHi) / nLo : 0;  // rounded to float32 by the store
    levels[2 * b + 1] = nHi > 0 ? sHi / nHi : 0;
  }
  return concat([new Uint8Array(levels.buffer), codes]);
}

/** levels + codes (a Uint8Array of exactly int2Size(k, block) bytes) -> k float32 values;
 * BadUpdate on a wrong size, a negative or non-finite level, or non-zero pad bits. */
export function int2Decode(data, k, block) {
  if (data.length !== int2Size(k, block)) {
    throw bad(`int2 values: ${data.length} bytes for k = ${k}, block ${block}`);
  }
  const nl = 2 * ceilDiv(k, block);
  const levels = new Float32Array(data.slice(0, 4 * nl).buffer);
  for (const v of levels) {
    if (!(v >= 0 && v < Infinity)) throw bad('int2 values: a level is negative or not finite');
  }
  const codes = data.subarray(4 * nl);
  if (k % 4 && codes[codes.length - 1] >> (2 * (k % 4))) throw bad('int2 values: non-zero pad bits');
  const out = new Float32Array(k);
  for (let i = 0; i < k; i++) {
    const c = (codes[i >> 2] >> (2 * (i & 3))) & 3;
    const mag = levels[2 * Math.floor(i / block) + (c >> 1)];
    out[i] = c & 1 ? -mag : mag;
  }
  return out;
}
