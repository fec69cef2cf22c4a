// Checks the JS protocol code against the golden vectors of shared/testdata/ (codecs.json,
// frames.json). Each check returns a list of {name, ok, error?}; the self-test page and
// the e2e suite read them. Runs in a browser and in node (for quick local checks).

import { decodePayload, decodeUpdate, encode } from './codecs.js';
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

export { decodePayload };
