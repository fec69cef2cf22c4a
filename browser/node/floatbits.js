// Exact float helpers shared by the codecs: IEEE half <-> double, round-half-even, hex.
// Everything here matches Python's struct 'e' packing and round() bit for bit.

if (new Uint8Array(new Uint32Array([1]).buffer)[0] !== 1) {
  throw new Error('daa-prime browser node: a little-endian platform is required');
}

const TWO_M24 = 2 ** -24;

/** round(x) as Python does it for a float: to the nearest integer, ties to even. */
export function rint(x) {
  const f = Math.floor(x);
  const d = x - f;  // exact for doubles
  if (d < 0.5) return f;
  if (d > 0.5) return f + 1;
  return f % 2 === 0 ? f : f + 1;
}

/** IEEE binary16 bits of a finite double, round-to-nearest-even; 0x7C00 (inf) on overflow. */
export function halfBits(x) {
  const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0;
  const a = Math.abs(x);
  if (a >= 65520) return sign | 0x7c00;
  if (a < 2 ** -14) return sign | rint(a / TWO_M24);  // subnormal; 1024 becomes the min normal
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e -= 1;
  else if (2 ** (e + 1) <= a) e += 1;
  const m = rint(a * 2 ** (10 - e));  // exact scaling; m in [1024, 2048]
  return sign | (((e + 15) << 10) + (m - 1024));  // m = 2048 carries into the exponent
}

/** IEEE binary16 bits of x, saturating at +-65504 (the fp16 codec's rule). */
export function halfBitsSaturating(x) {
  const h = halfBits(x);
  return (h & 0x7fff) === 0x7c00 ? (h & 0x8000) | 0x7bff : h;
}

/** halfBits for a finite float32 given by its bits `u` (numpy's npy_floatbits_to_halfbits:
 * exact round-to-nearest-even on the bits, ~50x faster than halfBits), saturating at +-65504. */
export function halfBitsOfF32(u) {
  const sign = (u >>> 16) & 0x8000;
  const f = u & 0x7fffffff;
  const fexp = f & 0x7f800000;
  if (fexp >= 0x47800000) return sign | 0x7bff;  // >= 65536: saturate (finite inputs only)
  if (fexp <= 0x38000000) {  // a subnormal half or zero
    if (fexp < 0x33000000) return sign;
    let sig = (0x800000 + (f & 0x7fffff)) >>> (113 - (fexp >>> 23));
    if ((sig & 0x3fff) !== 0x1000 || (f & 0x7ff)) sig += 0x1000;
    return sign + (sig >>> 13);  // a carry into the exponent is right
  }
  let sig = f & 0x7fffff;
  if ((sig & 0x3fff) !== 0x1000) sig += 0x1000;
  const h = ((fexp - 0x38000000) >>> 13) + (sig >>> 13);
  return sign | (h >= 0x7c00 ? 0x7bff : h);  // rounds to inf: saturate
}

let HALF_TABLE = null;

/** The float32 value of every half (a 256 KB table, built on first use). */
export function halfTable() {
  if (!HALF_TABLE) {
    HALF_TABLE = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) HALF_TABLE[h] = halfToFloat(h);
  }
  return HALF_TABLE;
}

/** The double value of IEEE binary16 bits. */
export function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * TWO_M24;
  if (exp === 31) return mant ? NaN : sign * Infinity;
  return sign * (1024 + mant) * 2 ** (exp - 25);
}

/** x rounded to the nearest-even half after clamping to +-65504 (an fp16 scale). */
export function f16Round(x) {
  return halfToFloat(halfBits(Math.min(65504, Math.max(-65504, x))));
}

export function toHex(bytes) {
  let s = '';
  for (const b of bytes) s += b.toString(16).padStart(2, '0');
  return s;
}

export function fromHex(hex) {
  if (hex.length % 2 || /[^0-9a-fA-F]/.test(hex)) throw new Error('not a hex string');
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.substr(2 * i, 2), 16);
  return out;
}

/** The bytes of a typed array (a view, no copy). */
export function bytesOf(view) {
  return new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
}
