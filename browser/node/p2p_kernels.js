// The hot loops of a tab in a `p2p` run, run in the participant worker (never on the page's
// main thread): reducing an owned shard with the round's coordinate-wise rule and encoding it
// in the round's result codec, and the outer step the tab applies from the reduced shards.
// Both must give the bytes the native members and the server compute, bit for bit:
//
// - reduceShard: shared.aggregation's mean / median / trimmed-mean as their numpy paths run
//   them: the mean a float32 sum in member order (Math.fround after each add) divided by n,
//   in float64 for a coordinate where that sum overflows; the trimmed mean a float64 sum in ascending
//   order; the median's middle values averaged in float64; `+ 0.0` (no negative zero), one
//   rounding to float32 at the end; then codecs.js's encode (checked against the golden vectors).
// - reduceShard('secagg-sum', ...): secure p2p rounds, the masked u32 words summed mod 2^32.
// - outerStep: shared.outer.outer_step's numpy path, every operation rounded to float32
//   (Math.fround after each double op: exact for + and *, since 53 >= 2 * 24 + 2).
//
//   const payload = reduceShard('median', 0, 'fp16', [u8SliceOfA, u8SliceOfB, ...]);
//   const { theta, m } = outerStep(thetaU8, aggregateU8, momentumU8, 0.7, 0.9, true);

import { encode } from './codecs.js';

function f32(u8) {
  if (u8.byteOffset % 4 === 0) return new Float32Array(u8.buffer, u8.byteOffset, u8.byteLength >> 2);
  return new Float32Array(u8.slice().buffer);
}

function bytesOf(f) { return new Uint8Array(f.buffer, f.byteOffset, f.byteLength); }

/** The rule over the slices (Float32Array each, member order) as float32 values. */
export function reduceValues(rule, f, slices) {
  const n = slices.length;
  if (n === 0) throw new Error('no slices to reduce');
  const d = slices[0].length;
  for (const s of slices) if (s.length !== d) throw new Error('slices differ in length');
  const out = new Float32Array(d);
  if (rule === 'mean') {
    const fr = Math.fround;
    for (let j = 0; j < d; j++) {
      let acc = 0.0 + slices[0][j];  // a sum from +0: no -0 sum
      for (let i = 1; i < n; i++) acc = fr(acc + slices[i][j]);  // the float32 add
      out[j] = acc / n;  // rounded once by the store: the float32 division
      if (!Number.isFinite(out[j])) {  // the float32 sum overflowed: this column in float64
        acc = 0.0 + slices[0][j];
        for (let i = 1; i < n; i++) acc += slices[i][j];
        out[j] = acc / n;
      }
    }
  } else if (rule === 'median' || rule === 'trimmed-mean') {
    const col = new Float64Array(n);
    const m = n >> 1;
    const k = n - 2 * f;
    if (rule === 'trimmed-mean' && k < 1) throw new Error(`trimmed mean of ${n} with f=${f}`);
    for (let j = 0; j < d; j++) {
      for (let i = 0; i < n; i++) col[i] = slices[i][j];
      col.sort();
      let v;
      if (rule === 'median') v = n % 2 ? col[m] : (col[m - 1] + col[m]) / 2;
      else {
        let acc = col[f];
        for (let i = f + 1; i < n - f; i++) acc += col[i];
        v = acc / k;
      }
      out[j] = v + 0.0;
    }
  } else {
    throw new Error(`p2p reduction needs mean, median or trimmed-mean, not ${rule}`);
  }
  for (let j = 0; j < d; j++) if (!Number.isFinite(out[j])) throw new Error('reduced shard is not finite');
  return out;
}

/** `secagg-sum` (shared/secagg/p2p.py's ring_sum): the members' masked u32 LE words added
 * in Z_2^32, in member order; the bytes of that sum (no float, no codec). */
export function ringSum(slices) {
  const n = slices.length;
  if (n === 0) throw new Error('no slices to reduce');
  const len = slices[0].byteLength;
  if (len % 4 !== 0) throw new Error(`masked slice of ${len} bytes is not u32 words`);
  const d = len >> 2;
  const acc = new Uint32Array(d);
  for (const s of slices) {
    if (s.byteLength !== len) throw new Error('slices differ in length');
    const dv = new DataView(s.buffer, s.byteOffset, s.byteLength);
    for (let j = 0; j < d; j++) acc[j] = (acc[j] + dv.getUint32(4 * j, true)) >>> 0;
  }
  const out = new Uint8Array(len);
  const ov = new DataView(out.buffer);
  for (let j = 0; j < d; j++) ov.setUint32(4 * j, acc[j], true);
  return out;
}

/** Reduce one shard and encode it: (rule, f, result codec, Uint8Array slices) -> payload. */
export function reduceShard(rule, f, codec, slices) {
  if (!['raw32', 'fp16', 'bf16'].includes(codec)) throw new Error(`result codec ${codec}`);
  if (rule === 'secagg-sum') {
    if (codec !== 'raw32') throw new Error(`secagg-sum takes raw32 words, not ${codec}`);
    return ringSum(Array.from(slices));
  }
  return encode(codec, reduceValues(rule, f, Array.from(slices, f32)));
}

/** theta_{r+1}, m_{r+1} = outer_step(theta_r, aggregate_r, m_r), float32 LE bytes in and out. */
export function outerStep(thetaU8, aggU8, momentumU8, lr, mu, nesterov) {
  const theta = f32(thetaU8);
  const g = f32(aggU8);
  const m0 = f32(momentumU8);
  const d = theta.length;
  if (g.length !== d || m0.length !== d) throw new Error(`outer step: lengths ${d}, ${g.length}, ${m0.length}`);
  const fr = Math.fround;
  const muf = fr(mu);
  const lrf = fr(lr);
  const t = new Float32Array(d);
  const m = new Float32Array(d);
  for (let i = 0; i < d; i++) {
    const mi = fr(fr(muf * m0[i]) + g[i]);
    m[i] = mi;
    const step = nesterov ? fr(g[i] + fr(muf * mi)) : mi;
    t[i] = fr(theta[i] - fr(lrf * step));
  }
  return { theta: bytesOf(t), m: bytesOf(m) };
}
