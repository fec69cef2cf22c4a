// Pyodide in the tab: load the runtime from /static/vendor/pyodide/, fetch /pkg/shared.zip
// (checked against its X-Content-SHA256), unpack it, make `shared` importable, and register
// the tab's ML-DSA-65 and zstd with shared.platform (daa_glue.py).
//
//   const py = await loadShared();          // a Pyodide instance where `import shared` works
//   py.runPython('from shared.messages import decode_message');

import { generateIdentity, sign, verify } from './identity.js';
import { toHex } from './floatbits.js';
import { canCompress, compress, decompress } from './zstd.js';
import { encode, withErrorFeedback } from './codecs.js';
import { addMasks, kemDecaps, kemEncaps, kemKeygen } from './secagg.js';
import { outerStep, reduceShard } from './p2p_kernels.js';
import { sparseStep } from './sparse_step.js';

export const PYODIDE_URL = '/static/vendor/pyodide/';
export const SHARED_ZIP_URL = '/pkg/shared.zip';
export const SITE_DIR = '/home/pyodide/daa';

async function fetchChecked(url) {
  const resp = await fetch(url, { cache: 'no-cache' });
  if (!resp.ok) throw new Error(`GET ${url}: HTTP ${resp.status}`);
  const buf = await resp.arrayBuffer();
  const want = resp.headers.get('X-Content-SHA256');
  const got = toHex(new Uint8Array(await crypto.subtle.digest('SHA-256', buf)));
  if (want && want !== got) throw new Error(`GET ${url}: SHA-256 ${got}, header says ${want}`);
  return { buf, sha256: got };
}

/** The functions daa_glue.py calls (bytes cross as Uint8Array). */
export const bridge = {
  mldsaKeygen: () => generateIdentity(),
  mldsaSign: (secretKey, message, context) => sign(secretKey, message, context),
  mldsaVerify: (publicKey, message, signature, context) => verify(publicKey, message, signature, context),
  // secure aggregation's pair keys (shared.platform.Kem): ML-KEM-768
  mlkemKeygen: () => kemKeygen(),
  mlkemEncaps: (publicKey) => kemEncaps(publicKey),
  mlkemDecaps: (secretKey, cipherText) => kemDecaps(secretKey, cipherText),
  secaggAddMasks: (words, seeds, signs, start) => addMasks(words, seeds, Array.from(signs), start),
  zstdCanCompress: () => canCompress(),
  zstdCompress: (data) => compress(data),
  zstdDecompress: (data, maxSize) => decompress(data, maxSize),
  // p2p runs (p2p_glue.py): reduce an owned shard, apply the outer step (float32 LE bytes)
  reduceShard: (rule, f, codec, slices) => reduceShard(rule, f, codec, slices),
  outerStep: (theta, agg, m, lr, mu, nesterov) => outerStep(theta, agg, m, lr, mu, nesterov),
  // SparseLoCo's "sparse" RoundOpen (shared.platform.SparseStepper): theta_r's bytes
  sparseStep: (theta, payload) => sparseStep(theta, payload),
  // the participant's hot loop (shared.platform.UpdateEncoder): float32 LE bytes in and out
  encodeCodecs: () => ['raw32', 'fp16', 'bf16', 'int8-block', 'int4-block', 'topk'],
  encodeUpdate: (name, paramsJson, delta, residual, errorFeedback) => {
    const params = JSON.parse(paramsJson);
    const d = new Float32Array(delta.buffer.slice(delta.byteOffset, delta.byteOffset + delta.byteLength));
    if (!errorFeedback) return { payload: encode(name, d, params), residual: undefined };
    const r = residual ? new Float32Array(residual.buffer.slice(residual.byteOffset, residual.byteOffset + residual.byteLength)) : null;
    const out = withErrorFeedback(name, params, d, r);
    const lossless = out.residual.every((v) => v === 0);
    // undefined, not null: Pyodide turns undefined into None (null is a JsNull object)
    return { payload: out.payload, residual: lossless ? undefined : new Uint8Array(out.residual.buffer) };
  },
};

/** Load Pyodide and our `shared` package; returns {pyodide, timings (ms), sha256}. */
export async function loadShared({ indexURL = PYODIDE_URL, zipURL = SHARED_ZIP_URL } = {}) {
  const t0 = performance.now();
  const { loadPyodide } = await import(`${indexURL}pyodide.mjs`);
  const [pyodide, zip] = await Promise.all([loadPyodide({ indexURL }), fetchChecked(zipURL)]);
  const t1 = performance.now();
  pyodide.unpackArchive(zip.buf, 'zip', { extractDir: SITE_DIR });
  pyodide.runPython(`import sys\nif ${JSON.stringify(SITE_DIR)} not in sys.path: sys.path.insert(0, ${JSON.stringify(SITE_DIR)})`);
  pyodide.registerJsModule('daa_bridge', bridge);
  const glue = await fetch(new URL('./daa_glue.py', import.meta.url), { cache: 'no-cache' });
  if (!glue.ok) throw new Error(`daa_glue.py: HTTP ${glue.status}`);
  pyodide.runPython(await glue.text(), { filename: 'daa_glue.py' });
  const t2 = performance.now();
  return { pyodide, sha256: zip.sha256, timings: { runtime_ms: t1 - t0, shared_ms: t2 - t1 } };
}
