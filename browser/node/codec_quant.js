// Block quantization (int8-block, int4-block; top-k's int8 values), byte-identical with
// shared/codecs/quant.py: scale in float64, stored as f32 or f16, the STORED scale quantizes
// with round-half-even; decode f32(q * s) or f32(offset + q * s).

import { bad, ceilDiv, concat, MAX_BLOCK } from './codec_base.js';
import { bytesOf, f16Round, halfBits, halfToFloat, rint } from './floatbits.js';

export const MODES = ['absmax', 'minmax'];
export const SCALE_DTYPES = ['fp32', 'fp16'];

/** Block quantizer body (scales, offsets, q) exactly as shared/codecs/quant.py writes it. */
export function quantBody(x, bits, { block, mode, scale_dtype: sd }) {
  const n = x.length;
  const nb = ceilDiv(n, block);
  const qmax = (1 << (bits - 1)) - 1;
  const absmax = mode === 'absmax';
  const levels = absmax ? qmax : 2 * qmax + 1;
  const [loQ, hiQ] = absmax ? [-qmax, qmax] : [0, levels];
  const scales = sd === 'fp32' ? new Float32Array(nb) : new Uint16Array(nb);
  const offsets = new Float32Array(absmax ? 0 : nb);
  const q = new Int16Array(n);
  for (let j = 0; j < nb; j++) {
    const a = j * block;
    const b = Math.min(n, a + block);
    let lo = 0;
    let scale;
    if (absmax) {
      let m = 0;
      for (let i = a; i < b; i++) m = Math.max(m, Math.abs(x[i]));
      scale = Math.abs(m / levels);
    } else {
      let mn = x[a];
      let mx = x[a];
      for (let i = a + 1; i < b; i++) { if (x[i] < mn) mn = x[i]; if (x[i] > mx) mx = x[i]; }
      lo = mn + 0;  // -0.0 -> +0.0
      scale = Math.abs((mx - lo) / levels);
      offsets[j] = lo;
    }
    const s = sd === 'fp32' ? Math.fround(scale) : f16Round(scale);
    if (sd === 'fp32') scales[j] = s; else scales[j] = halfBits(s);
    if (s !== 0) {
      for (let i = a; i < b; i++) q[i] = Math.min(hiQ, Math.max(loQ, rint((x[i] - lo) / s)));
    }
  }
  let qbytes;
  if (bits === 8) {
    qbytes = new Uint8Array(n);
    for (let i = 0; i < n; i++) qbytes[i] = q[i] & 0xff;
  } else {
    qbytes = new Uint8Array((n + 1) >> 1);
    const off = absmax ? 8 : 0;
    for (let i = 0; i < n; i++) qbytes[i >> 1] |= (q[i] + off) << ((i & 1) * 4);
  }
  return concat([bytesOf(scales), bytesOf(offsets), qbytes]);
}

/** The 7 header bytes after the wire id: mode, scale dtype, reserved 0, block (u32). */
export function quantHeader({ block, mode, scale_dtype: sd }) {
  const h = new DataView(new ArrayBuffer(7));
  h.setUint8(0, MODES.indexOf(mode));
  h.setUint8(1, SCALE_DTYPES.indexOf(sd));
  h.setUint32(3, block, true);
  return new Uint8Array(h.buffer);
}

export function decodeQuant(r, length, bits, p) {
  const absmax = p.mode === 'absmax';
  const ssize = p.scale_dtype === 'fp32' ? 4 : 2;
  const nb = ceilDiv(length, p.block);
  const nOff = absmax ? 0 : nb;
  const qlen = bits === 8 ? length : ceilDiv(length, 2);
  const body = r.expectExactly(nb * ssize + 4 * nOff + qlen, 'body');
  const dv = new DataView(body.buffer, body.byteOffset, body.byteLength);
  const scales = new Float64Array(nb);
  for (let j = 0; j < nb; j++) {
    const s = ssize === 4 ? dv.getFloat32(4 * j, true) : halfToFloat(dv.getUint16(2 * j, true));
    if (!Number.isFinite(s) || s < 0 || Object.is(s, -0)) throw bad(`${r.name}: negative or non-finite scale`);
    scales[j] = s;
  }
  const offsets = new Float64Array(nOff);
  for (let j = 0; j < nOff; j++) {
    offsets[j] = dv.getFloat32(nb * ssize + 4 * j, true);
    if (!Number.isFinite(offsets[j])) throw bad(`${r.name}: non-finite offset`);
  }
  const qraw = body.subarray(nb * ssize + 4 * nOff);
  const q = new Int16Array(length);
  if (bits === 8) {
    for (let i = 0; i < length; i++) q[i] = absmax ? (qraw[i] << 24) >> 24 : qraw[i];
    if (absmax && q.some((v) => v < -127)) throw bad(`${r.name}: q = -128 is not produced by the encoder`);
  } else {
    if (length % 2 && qraw[qraw.length - 1] >> 4) throw bad(`${r.name}: non-zero padding nibble`);
    for (let i = 0; i < length; i++) q[i] = (qraw[i >> 1] >> ((i & 1) * 4)) & 0x0f;
    if (absmax) {
      if (q.includes(0)) throw bad(`${r.name}: nibble 0 is not produced by the encoder`);
      for (let i = 0; i < length; i++) q[i] -= 8;
    }
  }
  const out = new Float32Array(length);
  for (let j = 0, i = 0; j < nb; j++) {
    const s = scales[j];
    const end = Math.min(length, i + p.block);
    if (absmax) for (; i < end; i++) out[i] = q[i] * s;
    else for (const lo = offsets[j]; i < end; i++) out[i] = lo + q[i] * s;
  }
  return out;
}

export function readQuantParams(r, name) {
  const mode = r.u8('header');
  const sd = r.u8('header');
  const zero = r.u8('header');
  const block = r.u32('header');
  if (mode >= MODES.length || sd >= SCALE_DTYPES.length || zero) {
    throw bad(`${name} header: mode ${mode}, scale dtype ${sd}, reserved ${zero}`);
  }
  if (block < 1 || block > MAX_BLOCK) throw bad(`${name} header: block ${block}`);
  return { block, mode: MODES[mode], scale_dtype: SCALE_DTYPES[sd] };
}
