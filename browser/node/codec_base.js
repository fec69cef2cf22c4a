// What the JS codecs share: a bounds-checked little-endian reader (running past the end is
// BadUpdate, as in shared/codecs/base.py), and small exact helpers.

import { BadUpdate } from './errors.js';

export const MAX_BLOCK = 2 ** 24;
export const bad = (message, field = 'payload') => new BadUpdate(message, field);
export const ceilDiv = (a, b) => (a - (a % b)) / b + (a % b ? 1 : 0);  // exact for safe integers

export function concat(parts) {
  const out = new Uint8Array(parts.reduce((s, p) => s + p.length, 0));
  let pos = 0;
  for (const p of parts) { out.set(p, pos); pos += p.length; }
  return out;
}

export class Reader {
  constructor(bytes, name) {
    this.b = bytes;
    this.dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
    this.name = name;
  }

  get remaining() { return this.b.length - this.pos; }

  take(n, what) {
    if (n < 0 || n > this.remaining) {
      throw bad(`${this.name} payload truncated: ${what} needs ${n} bytes, ${this.remaining} left`);
    }
    this.pos += n;
    return this.b.subarray(this.pos - n, this.pos);
  }

  expectExactly(n, what) {
    if (n !== this.remaining) {
      throw bad(`${this.name} payload has ${this.remaining} bytes of ${what}, expected ${n}`);
    }
    return this.take(n, what);
  }

  u8(what) { return this.take(1, what)[0]; }
  u16(what) { this.take(2, what); return this.dv.getUint16(this.pos - 2, true); }
  u32(what) { this.take(4, what); return this.dv.getUint32(this.pos - 4, true); }
}
