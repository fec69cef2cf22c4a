// Secure aggregation in the tab (docs/privacy.md): ML-KEM-768 from @noble/post-quantum
// (FIPS 203), which daa_glue.py registers with shared.platform (register_kem) so that the one
// participant (shared/secagg in Pyodide) agrees pair keys with pqcrypto's on native nodes; and
// the mask PRG in JS, bit-identical with shared/secagg/prg.py (golden vectors in
// shared/testdata/secagg.json, checked by golden.js):
//
//   mask(seed)[i] = u32 LE word (i mod B) of SHAKE-128(DOMAIN || seed || u64 LE (i div B))

import { sha256 } from '@noble/hashes/sha2.js';
import { shake128 } from '@noble/hashes/sha3.js';
import { ml_kem768 } from '@noble/post-quantum/ml-kem.js';

export const PRG_DOMAIN = new TextEncoder().encode('DAAP-SECAGG-PRG-v1');
export const PRG_BLOCK = 1 << 16;

/** ML-KEM-768 key pair: {publicKey (1184 bytes), secretKey (2400 bytes)}. */
export function kemKeygen() {
  const { publicKey, secretKey } = ml_kem768.keygen();
  return { publicKey, secretKey };
}

/** Encapsulate to `publicKey`: {cipherText (1088 bytes), sharedSecret (32 bytes)}. */
export function kemEncaps(publicKey) {
  const { cipherText, sharedSecret } = ml_kem768.encapsulate(publicKey);
  return { cipherText, sharedSecret: Uint8Array.from(sharedSecret) };
}

/** The shared secret of `cipherText` (throws on a malformed key or ciphertext length). */
export function kemDecaps(secretKey, cipherText) {
  return ml_kem768.decapsulate(cipherText, secretKey);
}

/** Words [start, stop) of the mask of a 32-byte `seed`, as a Uint32Array. */
export function maskWords(seed, start, stop) {
  if (seed.length !== 32) throw new Error('a mask seed is 32 bytes');
  if (!(start >= 0 && start <= stop)) throw new Error(`bad range [${start}, ${stop})`);
  const out = new Uint32Array(stop - start);
  const input = new Uint8Array(PRG_DOMAIN.length + 32 + 8);
  input.set(PRG_DOMAIN, 0);
  input.set(seed, PRG_DOMAIN.length);
  const dv = new DataView(input.buffer);
  for (let block = Math.floor(start / PRG_BLOCK); block * PRG_BLOCK < stop; block += 1) {
    const lo = Math.max(start, block * PRG_BLOCK);
    const hi = Math.min(stop, (block + 1) * PRG_BLOCK);
    dv.setBigUint64(PRG_DOMAIN.length + 32, BigInt(block), true);
    const bytes = shake128(input, { dkLen: 4 * (hi - block * PRG_BLOCK) });
    const words = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    for (let i = lo; i < hi; i += 1) out[i - start] = words.getUint32(4 * (i - block * PRG_BLOCK), true);
  }
  return out;
}

/** acc += sign * mask(seed)[start, start + acc.length) mod 2^32, in place. */
export function addMask(acc, seed, start, sign = 1) {
  const m = maskWords(seed, start, start + acc.length);
  for (let i = 0; i < acc.length; i += 1) acc[i] = (acc[i] + sign * m[i]) >>> 0;
  return acc;
}

const utf8 = new TextEncoder();
const fromHex = (h) => Uint8Array.from(h.match(/../g) || [], (b) => parseInt(b, 16));
const toHex = (a) => Array.from(a, (b) => b.toString(16).padStart(2, '0')).join('');

/** shared.secagg.crypto.derive: SHA-256("DAAP-SECAGG-" label 0x00 key (0x00 context)*). */
export function derive(label, key, ...context) {
  const parts = [utf8.encode(`DAAP-SECAGG-${label}`), key, ...context.map((c) => utf8.encode(c))];
  const len = parts.reduce((n, p) => n + p.length, 0) + parts.length - 1;
  const buf = new Uint8Array(len);
  let pos = 0;
  parts.forEach((p, i) => { if (i) buf[pos++] = 0; buf.set(p, pos); pos += p.length; });
  return sha256(buf);
}

const LIMIT = 2 ** 31 - 1;

/** shared.secagg.fixedpoint.FixedPoint.for_sum: the finest scale whose sum cannot overflow. */
export function fracBits(clip, maxParties) {
  let bits = Math.floor(Math.log2(LIMIT / (maxParties * clip)));
  while (bits > 0 && maxParties * Math.ceil(clip * 2 ** bits) > LIMIT) bits -= 1;
  return Math.max(bits, 0);
}

function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** Float values -> ring words: clip, scale by 2^bits, round half to even, mod 2^32. */
export function encodeFixed(values, clip, bits) {
  const out = new Uint32Array(values.length);
  for (let i = 0; i < values.length; i += 1) {
    const c = Math.min(Math.max(values[i], -clip), clip);
    out[i] = roundHalfEven(c * 2 ** bits) >>> 0;
  }
  return out;
}

/** Checks against shared/testdata/secagg.json: [{name, ok, error?}] (golden.js's format). */
export function checkSecagg(doc) {
  const results = [];
  const check = (name, fn) => {
    try {
      fn();
      results.push({ name, ok: true });
    } catch (exc) {
      results.push({ name, ok: false, error: String(exc?.message || exc) });
    }
  };
  const same = (got, want) => {
    if (got.length !== want.length || got.some((v, i) => v !== want[i])) {
      throw new Error(`got ${Array.from(got.slice(0, 4))}..., want ${want.slice(0, 4)}...`);
    }
  };
  for (const v of doc.prg) {
    check(`prg ${v.seed_hex.slice(0, 8)} [${v.start}, ${v.stop})`,
      () => same(Array.from(maskWords(fromHex(v.seed_hex), v.start, v.stop)), v.words));
  }
  const d = doc.prg_digest;
  check(`prg digest [${d.start}, ${d.stop})`, () => {
    const w = maskWords(fromHex(d.seed_hex), d.start, d.stop);
    const got = toHex(sha256(new Uint8Array(w.buffer)));
    if (got !== d.sha256) throw new Error(`sha256 ${got}, want ${d.sha256}`);
  });
  for (const k of doc.kdf) {
    check(`kdf ${k.label}`, () => {
      const got = toHex(derive(k.label, fromHex(k.key_hex), ...k.context));
      if (got !== k.out_hex) throw new Error(`${got}, want ${k.out_hex}`);
    });
  }
  const m = doc.masking;
  check('masked update', () => {
    const bits = fracBits(m.clip, m.max_parties);
    const words = new Uint8Array(encodeFixed(m.values.map(Math.fround), m.clip, bits).buffer);
    const seeds = [derive('self-mask', fromHex(m.self_seed_hex)),
      ...m.pairs.map(([key]) => derive('pair-mask', fromHex(key)))];
    const all = new Uint8Array(32 * seeds.length);
    seeds.forEach((seed, k) => all.set(seed, 32 * k));
    const out = addMasks(words, all, [1, ...m.pairs.map(([, sign]) => sign)], m.offset);
    same(Array.from(new Uint32Array(out.buffer)), m.words);
  });
  return results;
}

/** shared.platform.RingMasker for the tab's participant: u32 LE `words` plus, for each 32-byte
 * seed in `seeds` (concatenated), sign * its mask from word `start` on (mod 2^32). */
export function addMasks(words, seeds, signs, start) {
  const acc = new Uint32Array(words.length / 4);
  const dv = new DataView(words.buffer, words.byteOffset, words.byteLength);
  for (let i = 0; i < acc.length; i += 1) acc[i] = dv.getUint32(4 * i, true);
  signs.forEach((sign, k) => addMask(acc, seeds.subarray(32 * k, 32 * k + 32), start, sign));
  const out = new Uint8Array(words.length);
  const ov = new DataView(out.buffer);
  for (let i = 0; i < acc.length; i += 1) ov.setUint32(4 * i, acc[i], true);
  return out;
}
