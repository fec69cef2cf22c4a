// Checks the JS protocol code against the golden vectors of shared/testdata/ (codecs.json,
// frames.json). Each check returns a list of {name, ok, error?}. The one checker for both
// runtimes: the self-test page runs it in Chromium (e2e/test_golden_in_browser.py), and
// tests/js/golden_node.mjs runs it under Node.js inside pytest (tests/test_js_golden.py).

import { decodePayload, decodeUpdate, encode } from './codecs.js';
import { ProtocolError } from './errors.js';
import { bytesOf, fromHex, toHex } from './floatbits.js';
import { decodeFrame } from './frame.js';
import { decodeMessage, encodeMessage } from './messages.js';
import { verifyFrame } from './identity.js';

function attempt(name, fn) {
  try {
    const detail = fn();
    return { name, ok: true, ...(detail ? { detail } : {}) };
  } catch (exc) {
    return { name, ok: false, error: `${exc.name}: ${exc.message}` };
  }
}

function expectEqual(what, got, want) {
  if (got !== want) throw new Error(`${what}: got ${got.slice(0, 200)}, want ${want.slice(0, 200)}`);
}

function deepEqual(a, b) {
  return JSON.stringify(sortKeys(a)) === JSON.stringify(sortKeys(b));
}

function sortKeys(v) {
  if (Array.isArray(v)) return v.map(sortKeys);
  if (v && typeof v === 'object') return Object.fromEntries(Object.keys(v).sort().map((k) => [k, sortKeys(v[k])]));
  return v;
}

/** Every codec vector: decode (and encode where exact) byte for byte; invalid ones refused. */
export function checkCodecs(doc) {
  const results = [];
  for (const v of doc.valid) {
    const payload = fromHex(v.payload_hex);
    results.push(attempt(`decode ${v.name}`, () => {
      const out = decodeUpdate(payload, v.length, { expect: v.codec, layout: v.layout });
      expectEqual('decoded', toHex(bytesOf(out)), v.decoded_hex);
    }));
    if (v.exact_encode) {
      results.push(attempt(`encode ${v.name}`, () => {
        const input = new Float32Array(fromHex(v.input_hex).buffer);
        expectEqual('payload', toHex(encode(v.codec, input, v.params)), v.payload_hex);
      }));
    }
  }
  for (const v of doc.invalid) {
    results.push(attempt(`refuse ${v.name}`, () => {
      try {
        decodeUpdate(fromHex(v.payload_hex), v.length, { layout: v.layout });
      } catch (exc) {
        if (exc.code !== 'bad_update' || exc.field !== v.field) {
          throw new Error(`raised ${exc.code} field ${exc.field}, want bad_update field ${v.field}: ${exc.message}`);
        }
        return `${exc.code}/${exc.field}`;
      }
      throw new Error('decoded without error');
    }));
  }
  return results;
}

/** Every frame vector: valid ones decode to the same fields and re-encode to the same
 * bytes; invalid ones raise the same code and field; signed ones verify. */
export function checkFrames(doc) {
  const results = [];
  doc.valid.forEach((v, i) => {
    results.push(attempt(`frame ${i} ${v.type}`, () => {
      const bytes = fromHex(v.frame_hex);
      const msg = decodeMessage(bytes);
      if (msg.type !== v.type || msg.msgType !== v.msg_type) throw new Error(`decoded as ${msg.type}`);
      if (!deepEqual(msg.fields, v.fields)) throw new Error(`fields differ: ${JSON.stringify(msg.fields)}`);
      expectEqual('payload', toHex(msg.payload), v.payload_hex);
      const again = encodeMessage(v.type, v.fields, fromHex(v.payload_hex));
      expectEqual('re-encoded', toHex(again), v.frame_hex);
    }));
  });
  for (const v of doc.invalid) {
    results.push(attempt(`refuse ${v.name}`, () => {
      try {
        decodeMessage(fromHex(v.frame_hex));
      } catch (exc) {
        if (exc.code !== v.code || (exc.field ?? null) !== v.field) {
          throw new Error(`raised ${exc.code} field ${exc.field}, want ${v.code} field ${v.field}: ${exc.message}`);
        }
        return `${exc.code}/${exc.field}`;
      }
      throw new Error('decoded without error');
    }));
  }
  const s = doc.signed;
  for (const f of s.frames) {
    results.push(attempt(`verify signed ${f.type}`, () => {
      const frame = decodeFrame(fromHex(f.frame_hex));
      verifyFrame(frame, { publicKey: fromHex(s.public_key_hex), runId: s.run_id, nodeId: s.node_id });
      decodeMessage(fromHex(f.frame_hex));
      const tampered = fromHex(f.frame_hex);
      tampered[20] ^= 1;
      try {
        verifyFrame(decodeFrame(tampered), { publicKey: fromHex(s.public_key_hex), runId: s.run_id, nodeId: s.node_id });
      } catch (exc) {
        if (exc.code === 'bad_signature') return 'tampered copy refused';
        throw exc;
      }
      throw new Error('a tampered frame verified');
    }));
  }
  return results;
}

/** What decoding `bytes` as a message gives, in the words the Python tests use: 'ok',
 * '<code>/<field>' for a protocol error, 'crash: ...' for anything else. */
export function frameVerdict(bytes) {
  try {
    decodeMessage(bytes);
    return 'ok';
  } catch (exc) {
    if (exc instanceof ProtocolError) return `${exc.code}/${exc.field ?? null}`;
    return `crash: ${exc.name}: ${exc.message}`;
  }
}

export { decodePayload };
