// zstd for frame payloads (the ZSTD flag): decode with fzstd (pure JS, synchronous), encode
// with @bokuweb/zstd-wasm (needs `await initZstd()` first). Same contract as
// shared.platform.ZstandardZstd: one frame that declares its content size, refused before a
// byte is inflated when that size exceeds the caller's limit.

import { decompress as fzstdDecompress } from 'fzstd';

const MAGIC = 0xfd2fb528;
let wasm = null;

/** Load the zstd encoder (wasm). Decoding works without it. */
export async function initZstd(wasmUrl = '/static/vendor/@bokuweb/zstd-wasm/zstd.wasm') {
  if (wasm) return;
  const mod = await import('@bokuweb/zstd-wasm');
  await mod.init(wasmUrl);
  wasm = mod;
}

export const canCompress = () => wasm !== null;

/** The content size a zstd frame declares, or null when it declares none. */
export function frameContentSize(data) {
  if (data.length < 6) throw new RangeError('not a zstd frame: too short');
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (dv.getUint32(0, true) !== MAGIC) throw new RangeError('not a zstd frame: bad magic');
  const fhd = data[4];
  const fcsFlag = fhd >> 6;
  const single = (fhd >> 5) & 1;
  const pos = 5 + (single ? 0 : 1) + [0, 1, 2, 4][fhd & 3];
  const size = [single ? 1 : 0, 2, 4, 8][fcsFlag];
  if (size === 0) return null;
  if (data.length < pos + size) throw new RangeError('not a zstd frame: truncated header');
  if (size === 1) return data[pos];
  if (size === 2) return dv.getUint16(pos, true) + 256;
  if (size === 4) return dv.getUint32(pos, true);
  return Number(dv.getBigUint64(pos, true));
}

/** Inflate one zstd frame to at most `maxSize` bytes (RangeError otherwise). */
export function decompress(data, maxSize) {
  const size = frameContentSize(data);
  if (size === null) throw new RangeError('the zstd frame does not declare its content size');
  if (size > maxSize) throw new RangeError(`inflates to ${size} bytes, beyond the ${maxSize} byte limit`);
  let out;
  try {
    out = fzstdDecompress(data, new Uint8Array(size));
  } catch (exc) {
    throw new RangeError(`not a valid zstd frame: ${exc.message}`);
  }
  if (out.length !== size) throw new RangeError(`inflated to ${out.length} bytes, the frame declared ${size}`);
  return out;
}

/** One zstd frame (level 3, content size declared), like zstandard.ZstdCompressor(3). */
export function compress(data, level = 3) {
  if (!wasm) throw new Error('zstd encoder not loaded: await initZstd() first');
  return wasm.compress(data, level);
}

/** The object messages.js (and the Pyodide bridge) take as `zstd`. */
export const zstd = { compress, decompress };
