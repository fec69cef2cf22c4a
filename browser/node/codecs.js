// Update codecs in JS: byte-identical with shared/codecs/ (checked against
// shared/testdata/codecs.json). Decoders for every codec, encoders for all but PowerSGD (its
// encoder is numpy-only in Python too). Byte layouts: docs/protocol.md, "Codecs".
//
//   const payload = encode('int8-block', float32Array, {block: 1024});
//   const vec = decodeUpdate(payload, length, {expect: 'int8-block', layout});  // Float32Array
//   const {payload, residual} = withErrorFeedback('topk', {fraction: 0.01}, delta, residual);
//
// Decoders throw only BadUpdate (field 'codec', 'length', 'layout' or 'payload'), and check
// every declared size against `length` and the bytes left BEFORE allocating.

import { bad, ceilDiv, concat, MAX_BLOCK, Reader } from './codec_base.js';
import { decodeQuant, MODES, quantBody, quantHeader, readQuantParams, SCALE_DTYPES } from './codec_quant.js';
import { BadUpdate } from './errors.js';
import { int2Decode, int2Encode, int2Size } from './codec_int2.js';
import { bytesOf, halfBitsOfF32, halfTable } from './floatbits.js';

export const WIRE_IDS = Object.freeze({
  raw32: 0, fp16: 1, bf16: 2, 'int8-block': 3, 'int4-block': 4, topk: 5, powersgd: 6,
});
const NAMES = Object.keys(WIRE_IDS);
const VALUE_KINDS = ['int8', 'fp16', 'int2'];  // 'int2': codec_int2.js
const VARINT_LIMIT = 2 ** 32;
export const DEFAULTS = Object.freeze({
  raw32: {}, fp16: {}, bf16: {},
  'int8-block': { block: 1024, mode: 'absmax', scale_dtype: 'fp32' },
  'int4-block': { block: 64, mode: 'absmax', scale_dtype: 'fp32' },
  topk: { fraction: 0.01, values: 'int8', block: 256 },
  powersgd: { rank: 4, seed: 0 },
});

// -- params (make_codec) ------------------------------------------------------------------
function isInt(v) { return Number.isInteger(v); }

/** The codec's full parameters (defaults filled in); throws naming what is wrong. */
export function codecParams(name, params = {}) {
  if (!(name in WIRE_IDS)) throw new Error(`unknown codec ${JSON.stringify(name)}`);
  const known = Object.keys(DEFAULTS[name]);
  const unknown = Object.keys(params).filter((k) => !known.includes(k)).sort();
  if (unknown.length) throw new Error(`codec ${name} has no parameter(s) ${unknown}`);
  const p = { ...DEFAULTS[name], ...params };
  if ('block' in p && !(isInt(p.block) && p.block >= 1 && p.block <= MAX_BLOCK)) {
    throw new Error(`block must be an int in [1, ${MAX_BLOCK}], got ${p.block}`);
  }
  if ('mode' in p && !MODES.includes(p.mode)) throw new Error(`mode must be one of ${MODES}`);
  if ('scale_dtype' in p && !SCALE_DTYPES.includes(p.scale_dtype)) {
    throw new Error(`scale_dtype must be one of ${SCALE_DTYPES}`);
  }
  if (name === 'topk') {
    if (typeof p.fraction !== 'number' || !(p.fraction > 0 && p.fraction <= 1)) {
      throw new Error(`fraction must be a number in (0, 1], got ${p.fraction}`);
    }
    if (!VALUE_KINDS.includes(p.values)) throw new Error(`values must be one of ${VALUE_KINDS}`);
  }
  if (name === 'powersgd' && !(isInt(p.rank) && p.rank >= 1 && p.rank <= 0xffff)) {
    throw new Error(`rank must be an int in [1, 65535], got ${p.rank}`);
  }
  return p;
}

// -- encode -------------------------------------------------------------------------------
function asF32(values) {
  const x = values instanceof Float32Array ? values : Float32Array.from(values);
  for (let i = 0; i < x.length; i++) {
    if (!Number.isFinite(x[i])) throw new RangeError('values contain NaN or infinity; refusing to encode');
  }
  return x;
}

function packF16(vals) {  // vals: a Float32Array
  const u = new Uint32Array(vals.buffer, vals.byteOffset, vals.length);
  const out = new Uint16Array(vals.length);
  for (let i = 0; i < vals.length; i++) out[i] = halfBitsOfF32(u[i]);
  return bytesOf(out);
}

/** The (n - k)-th smallest of `a` (a Float32Array, reordered): quickselect, O(n). */
function select(a, k) {
  let lo = 0;
  let hi = a.length - 1;
  while (hi > lo) {
    const pivot = a[(lo + hi) >>> 1];
    let i = lo;
    let j = hi;
    while (i <= j) {
      while (a[i] < pivot) i++;
      while (a[j] > pivot) j--;
      if (i <= j) { const t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
    }
    if (k <= j) hi = j;
    else if (k >= i) lo = i;
    else break;
  }
  return a[k];
}

function bf16Body(x) {
  const u = new Uint32Array(x.buffer, x.byteOffset, x.length);
  const out = new Uint16Array(x.length);
  for (let i = 0; i < x.length; i++) {
    const h = (u[i] + 0x7fff + ((u[i] >>> 16) & 1)) >>> 16;  // < 2**32 for finite values
    out[i] = (h & 0x7fff) === 0x7f80 ? h - 1 : h;  // would be inf: saturate
  }
  return bytesOf(out);
}

function varintEncode(values) {
  const out = [];
  for (let v of values) {
    while (v >= 0x80) { out.push((v & 0x7f) | 0x80); v = Math.floor(v / 128); }
    out.push(v);
  }
  return Uint8Array.from(out);
}

function topkBody(x, { fraction, values, block }) {
  const n = x.length;
  if (n >= VARINT_LIMIT) throw new RangeError(`topk indices are 32-bit: ${n} values is too many`);
  const k = n === 0 ? 0 : Math.min(n, Math.max(1, Math.ceil(fraction * n)));
  const mags = new Float32Array(n);
  for (let i = 0; i < n; i++) mags[i] = Math.abs(x[i]);
  const idx = new Uint32Array(k);
  if (k === n) {
    for (let i = 0; i < n; i++) idx[i] = i;
  } else {  // the k-th largest magnitude t; ties go to the lower index
    const t = select(mags.slice(), n - k);
    let above = 0;
    for (let i = 0; i < n; i++) if (mags[i] > t) above++;
    let ties = k - above;
    for (let i = 0, j = 0; i < n; i++) {
      if (mags[i] > t) idx[j++] = i;
      else if (mags[i] === t && ties > 0) { idx[j++] = i; ties--; }
    }
  }
  const vals = new Float32Array(k);
  for (let j = 0; j < k; j++) vals[j] = x[idx[j]];
  const head = new DataView(new ArrayBuffer(11));
  head.setUint8(0, VALUE_KINDS.indexOf(values));
  head.setUint32(3, k, true);
  head.setUint32(7, values === 'fp16' ? 0 : block, true);
  const vbytes = values === 'fp16' ? packF16(vals) : values === 'int2' ? int2Encode(vals, block)
    : quantBody(vals, 8, { block, mode: 'absmax', scale_dtype: 'fp32' });
  const gaps = idx.map((v, j) => v - (j ? idx[j - 1] : 0));  // a Uint32Array
  return concat([new Uint8Array(head.buffer), vbytes, varintEncode(gaps)]);
}

/** Encode a float32 vector with codec `name` (params as shared.codecs.make_codec takes). */
export function encode(name, values, params = {}) {
  const p = codecParams(name, params);
  const x = asF32(values);
  const head = Uint8Array.of(WIRE_IDS[name]);
  switch (name) {
    case 'raw32': return concat([head, bytesOf(x)]);
    case 'fp16': return concat([head, packF16(x)]);
    case 'bf16': return concat([head, bf16Body(x)]);
    case 'int8-block': return concat([head, quantHeader(p), quantBody(x, 8, p)]);
    case 'int4-block': return concat([head, quantHeader(p), quantBody(x, 4, p)]);
    case 'topk': return concat([head, topkBody(x, p)]);
    default: throw new Error(`${name}: no JS encoder (PowerSGD encodes with numpy only)`);
  }
}

// -- decode -------------------------------------------------------------------------------

function varintDecode(data, count) {
  const out = [];
  let v = 0;
  let mul = 1;
  let nbytes = 0;
  for (const b of data) {
    v += (b & 0x7f) * mul;
    nbytes++;
    if (b & 0x80) {
      mul *= 128;
      if (nbytes === 5) throw bad('varint longer than 5 bytes');
      continue;
    }
    if (nbytes > 1 && b === 0) throw bad('non-minimal varint');
    if (v >= VARINT_LIMIT) throw bad('varint exceeds 2**32 - 1');
    out.push(v);
    v = 0; mul = 1; nbytes = 0;
  }
  if (nbytes) throw bad('varint section ends inside a varint');
  if (out.length !== count) throw bad(`varint section holds ${out.length} values, expected ${count}`);
  return out;
}

/** A topk payload's (indices, values) without the dense vector: {idx: number[] ascending,
 * vals: Float32Array}, with every check of decodePayload (BadUpdate). */
export function decodeTopkSparse(data, length) {
  checkLength(length);
  if (payloadCodec(data) !== 'topk') throw bad(`payload is ${payloadCodec(data)}, expected topk`, 'codec');
  const r = new Reader(data, 'topk');
  r.take(1, 'wire id');
  return topkSparse(r, length);
}

function topkSparse(r, length) {
  const kind = r.u8('header');
  const zero = r.u16('header');
  const k = r.u32('header');
  let block = r.u32('header');
  if (kind >= VALUE_KINDS.length || zero) throw bad(`topk header: values kind ${kind}, reserved ${zero}`);
  if (kind === 1) {
    if (block) throw bad(`topk header: fp16 values with block ${block}`);
    block = 256;
  }
  if (block < 1 || block > MAX_BLOCK) throw bad(`topk header: block ${block}`);
  if (k > length) throw bad(`topk: k = ${k} exceeds length ${length}`);
  const vsize = kind === 1 ? 2 * k : kind === 2 ? int2Size(k, block) : 4 * ceilDiv(k, block) + k;
  const vbytes = r.take(vsize, 'values');
  if (!(k <= r.remaining && r.remaining <= 5 * k)) throw bad(`topk: ${r.remaining} bytes of varints for k = ${k}`);
  const idx = varintDecode(r.take(r.remaining, 'indices'), k);
  for (let j = 1; j < k; j++) {
    if (idx[j] === 0) throw bad('topk: indices do not increase');
    idx[j] += idx[j - 1];
  }
  if (k && idx[k - 1] >= length) throw bad(`topk: index ${idx[k - 1]} >= length ${length}`);
  let vals;
  if (kind === 1) {
    const dv = new DataView(vbytes.buffer, vbytes.byteOffset, vbytes.byteLength);
    const table = halfTable();
    vals = Float32Array.from({ length: k }, (_, i) => table[dv.getUint16(2 * i, true)]);
  } else if (kind === 2) {
    vals = int2Decode(vbytes, k, block);
  } else {
    vals = decodeQuant(new Reader(vbytes, 'topk'), k, 8, { block, mode: 'absmax', scale_dtype: 'fp32' });
  }
  return { idx, vals };
}

function decodeTopk(r, length) {
  const { idx, vals } = topkSparse(r, length);
  const k = idx.length;
  const out = new Float32Array(length);
  for (let j = 0; j < k; j++) out[idx[j]] = vals[j];
  return out;
}

/** PowerSGD's plan: which tensors of `layout` travel as factors (m, n) or raw (0, 0). */
export function powersgdPlan(layout, length, rank) {
  if (layout == null) throw bad('powersgd needs the parameter layout (layout=...)', 'layout');
  const plan = [];
  let offset = 0;
  for (const slot of layout) {
    const size = slot.shape.reduce((a, d) => a * d, 1);
    if (slot.offset !== offset || slot.length !== size || slot.shape.some((d) => d < 0)) {
      throw bad(`layout entry ${JSON.stringify(slot.name)} is not contiguous or mis-sized`, 'layout');
    }
    const [m, n] = slot.shape.length >= 2 && size ? [slot.shape[0], size / slot.shape[0]] : [0, 0];
    const lowRank = rank * (m + n) < m * n;
    plan.push({ offset, size, m: lowRank ? m : 0, n: lowRank ? n : 0 });
    offset += size;
  }
  if (offset !== length) throw bad(`layout covers ${offset} values, the vector has ${length}`, 'layout');
  return plan;
}

function f32At(bytes) {  // little-endian f32 values of `bytes` (copied: aligned)
  return new Float32Array(bytes.slice().buffer);
}

function decodePowersgd(r, length, layout) {
  const zero = r.u8('header');
  const rank = r.u16('header');
  if (zero) throw bad(`powersgd header: reserved byte ${zero}`);
  if (rank < 1) throw bad(`powersgd header: rank ${rank}`);
  const plan = powersgdPlan(layout, length, rank);
  const size = plan.reduce((s, t) => s + (t.m ? 4 * rank * (t.m + t.n) : 4 * t.size), 0);
  if (size !== r.remaining) {
    throw bad(`powersgd payload has ${r.remaining} bytes of factors, the layout needs ${size} at rank ${rank}`);
  }
  const out = new Float32Array(length);
  for (const { offset, size: sz, m, n } of plan) {
    if (!m) { out.set(f32At(r.take(4 * sz, 'values')), offset); continue; }
    const p = f32At(r.take(4 * m * rank, 'P'));
    const q = f32At(r.take(4 * n * rank, 'Q'));
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < n; j++) {
        let acc = p[i * rank] * q[j * rank];
        for (let c = 1; c < rank; c++) acc += p[i * rank + c] * q[j * rank + c];
        out[offset + i * n + j] = acc;
      }
    }
  }
  return out;
}

function checkLength(length) {
  if (!Number.isSafeInteger(length) || length < 0) {
    throw new BadUpdate(`length must be a non-negative int, got ${length}`, 'length');
  }
  return length;
}

/** The registry name of a payload's codec (by its first byte); BadUpdate if none. */
export function payloadCodec(data) {
  if (data.length === 0) throw bad('empty payload');
  const name = NAMES[data[0]];
  if (name === undefined) throw bad(`unknown codec wire id ${data[0]}`, 'codec');
  return name;
}

/** Decode ANY payload by its wire id -> Float32Array. Throws only BadUpdate. */
export function decodePayload(data, length, { layout = null } = {}) {
  checkLength(length);
  const name = payloadCodec(data);
  const r = new Reader(data, name);
  r.take(1, 'wire id');
  switch (name) {
    case 'raw32': return f32At(r.expectExactly(4 * length, 'float32 values'));
    case 'fp16': {
      const body = r.expectExactly(2 * length, 'float16 values');
      const h = new Uint16Array(body.slice().buffer);
      const table = halfTable();
      const out = new Float32Array(length);
      for (let i = 0; i < length; i++) out[i] = table[h[i]];
      return out;
    }
    case 'bf16': {
      const body = r.expectExactly(2 * length, 'bfloat16 values');
      const h = new Uint16Array(body.slice().buffer);
      const u = new Uint32Array(length);
      for (let i = 0; i < length; i++) u[i] = h[i] << 16;
      return new Float32Array(u.buffer);
    }
    case 'int8-block': return decodeQuant(r, length, 8, readQuantParams(r, name));
    case 'int4-block': return decodeQuant(r, length, 4, readQuantParams(r, name));
    case 'topk': return decodeTopk(r, length);
    default: return decodePowersgd(r, length, layout);
  }
}

/** decodePayload, refusing non-finite values; `expect` pins the codec's name. */
export function decodeUpdate(data, length, { expect = null, layout = null } = {}) {
  checkLength(length);
  const name = payloadCodec(data);
  if (expect !== null && name !== expect) throw bad(`payload is ${name}, expected ${expect}`, 'codec');
  const vec = decodePayload(data, length, { layout });
  for (let i = 0; i < vec.length; i++) {
    if (!Number.isFinite(vec[i])) throw bad('update contains NaN or infinite values');
  }
  return vec;
}

/** Encode delta + residual; the new residual is what the codec lost (float32, pure). */
export function withErrorFeedback(name, params, delta, residual = null, { layout = null } = {}) {
  const x = Float32Array.from(delta);
  if (residual !== null) {
    if (residual.length !== x.length) throw new RangeError('residual and delta lengths differ');
    for (let i = 0; i < x.length; i++) x[i] += residual[i];
  }
  const payload = encode(name, x, params);
  const back = decodePayload(payload, x.length, { layout });
  const res = new Float32Array(x.length);
  for (let i = 0; i < x.length; i++) res[i] = x[i] - back[i];
  return { payload, residual: res };
}
