// Control messages (shared/messages.py): one schema per wire type, the same checks in the
// same order, so that a refused frame gets the same error code and field as in Python.
//
//   const msg = decodeMessage(bytes);   // {type: 'Submit', msgType: 4, fields, payload, frame}
//   const bytes = encodeMessage('Submit', fields, payload, {sign, zstd});

import { sha256 } from '@noble/hashes/sha2.js';

import { BadUpdate, FrameError, MessageError } from './errors.js';
import { toHex } from './floatbits.js';
import {
  DEFAULT_MAX_PAYLOAD, FLAG_ZSTD, PyFloat, decodeFrame, encodeFrame, isFloatLiteral,
} from './frame.js';

const HEX64 = /^[0-9a-f]{64}$/;
const HEXSTR = /^(?:[0-9a-f]{2})+$/;
const NONCE = /^[0-9a-f]{32}$/;
const MAX_TEXT = 8192;
const MAX_CANDIDATES = 4096;
const COMPRESS_MIN = 1024;
const SERVER = 'server';

// Field types, in dataclass field order: s str, i int, f float, b bool, d dict, l list of
// dicts; a trailing '?' allows null. `payload` marks a type that carries one.
const S = 's';
export const SCHEMAS = {
  1: ['Hello', { node_id: S, public_key: S, challenge: S, nonce: S, runtime: S, agent: S, device: S, role: S,
    features: S }],
  2: ['Welcome', {
    run_id: S, node_id: S, model: 'd', model_id: S, data: 'd', shard: 'i', n_shards: 'i', codec: S,
    codec_params: 'd', error_feedback: 'b', n_params: 'i', nonce: S, transport: S, rtc_timeout_s: 'f',
    worker_momentum: 'f',
  }],
  3: ['RoundOpen', {
    run_id: S, round: 'i', attempt: 'i', params_digest: S, deadline_s: 'f', inner_steps: 'i',
    inner_lr: 'f', batch_size: 'i', nonce: S, base_digest: 's?', with_momentum: 'b',
    payload: 'payload',
  }],
  4: ['Submit', {
    run_id: S, round: 'i', node_id: S, nonce: S, codec: S, length: 'i', digest: S, train_loss: 'f?',
    samples: 'i', compute_s: 'f', payload: 'payload',
  }],
  5: ['Ack', { round: 'i', digest: S, status: S, nonce: S }],
  6: ['Error', { code: S, message: S, field: 's?', round: 'i?', nonce: S }],
  7: ['RoundCommitted', { round: 'i', eval_loss: 'f?', n_updates: 'i', params_digest: S, final: 'b', nonce: S }],
  8: ['Challenge', { run_id: S, challenge: S, server_public_key: S, protocol_version: 'i', agent: S, nonce: S }],
  9: ['ValidateRequest', {
    run_id: S, round: 'i', params_digest: S, codec: S, length: 'i', candidates: 'l', nonce: S,
    payload: 'payload',
  }],
  10: ['Verdict', { run_id: S, round: 'i', node_id: S, base_loss: 'f?', scores: 'l', nonce: S }],
  11: ['Signal', { run_id: S, node_id: S, to: S, kind: S, data: S, nonce: S }],
  12: ['Ready', {
    run_id: S, round: 'i', node_id: S, nonce: S, length: 'i', digest: S, train_loss: 'f?',
    samples: 'i', compute_s: 'f',
  }],
  13: ['ShardPlan', {
    run_id: S, round: 'i', plan: 'd', rule: S, byzantine_fraction: 'f', result_codec: S, nonce: S,
  }],
  14: ['Shard', {
    run_id: S, round: 'i', node_id: S, to: S, kind: S, shard: 'i', revision: 'i', nonce: S,
    payload: 'payload',
  }],
};
export const MESSAGE_TYPES = Object.fromEntries(Object.entries(SCHEMAS).map(([t, [n]]) => [n, Number(t)]));

const isDict = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
const codePoints = (s) => (s.length <= MAX_TEXT ? s.length : [...s].length);

function typeOk(holder, key, kind) {
  const v = holder[key];
  if (kind.endsWith('?')) {
    if (v === null) return true;
    kind = kind.slice(0, -1);
  }
  switch (kind) {
    case 'b': return typeof v === 'boolean';
    case 'i': return Number.isInteger(v) && !isFloatLiteral(holder, key);
    case 'f': return typeof v === 'number' && Number.isFinite(v);
    case 's': return typeof v === 'string' && codePoints(v) <= MAX_TEXT;
    case 'd': return isDict(v);
    case 'l': return Array.isArray(v) && v.every(isDict);
    default: throw new TypeError(`unsupported field type ${kind}`);
  }
}

function need(cond, cls, name, what) {
  if (!cond) throw new MessageError(`${cls}.${name}: ${what}`, name);
}

const hex64 = (cls, name, v) => need(HEX64.test(v), cls, name, 'must be 64 lowercase hex digits');
const digestHex = (payload) => toHex(sha256(payload));

function entries(cls, name, items, keys) {
  need(items.length <= MAX_CANDIDATES, cls, name, `at most ${MAX_CANDIDATES} entries`);
  const want = Object.keys(keys).sort().join(',');
  items.forEach((item, i) => {
    need(Object.keys(item).sort().join(',') === want, cls, name, `entry ${i} must have keys ${want}`);
    for (const [key, kind] of Object.entries(keys)) {
      const v = item[key];
      const ok = kind === 'f' ? v === null || (typeof v === 'number' && Number.isFinite(v))
        : typeOk(item, key, kind);
      need(ok, cls, name, `entry ${i}: ${key} must be ${kind}`);
      if (key === 'node_id' || key === 'digest') hex64(cls, name, v);
    }
  });
}

// __post_init__ of each dataclass, in its order.
const POST = {
  Hello(m) {
    need(['trainer', 'validator'].includes(m.role), 'Hello', 'role', 'must be trainer or validator');
    hex64('Hello', 'node_id', m.node_id);
    need(HEXSTR.test(m.public_key), 'Hello', 'public_key', 'must be lowercase hex');
    hex64('Hello', 'challenge', m.challenge);
    need(NONCE.test(m.nonce), 'Hello', 'nonce', 'must be 32 lowercase hex digits');
    need(['native', 'browser'].includes(m.runtime), 'Hello', 'runtime', "must be 'native' or 'browser'");
  },
  Welcome(m) {
    hex64('Welcome', 'model_id', m.model_id);
    need(m.n_shards >= 1, 'Welcome', 'n_shards', 'must be >= 1');
    need(m.shard >= 0 && m.shard < m.n_shards, 'Welcome', 'shard', 'must be < n_shards');
    need(m.n_params >= 1, 'Welcome', 'n_params', 'must be >= 1');
    need(['ws', 'star'].includes(m.transport), 'Welcome', 'transport', 'must be ws or star');
  },
  RoundOpen(m, payload) {
    need(m.round >= 0, 'RoundOpen', 'round', 'must be >= 0');
    need(m.inner_steps >= 1, 'RoundOpen', 'inner_steps', 'must be >= 1');
    need(m.batch_size >= 1, 'RoundOpen', 'batch_size', 'must be >= 1');
    need(m.deadline_s > 0, 'RoundOpen', 'deadline_s', 'must be a positive number');
    if (m.base_digest !== null) {  // a delta against base_digest, checked once applied
      hex64('RoundOpen', 'base_digest', m.base_digest);
      return;
    }
    need(payload.length % (m.with_momentum ? 8 : 4) === 0, 'RoundOpen', 'payload',
      'not float32 sized');
    const params = m.with_momentum ? payload.subarray(0, payload.length / 2) : payload;
    if (digestHex(params) !== m.params_digest) {
      throw new BadUpdate('RoundOpen: params digest does not match payload', 'params_digest');
    }
  },
  Submit(m, payload) {
    hex64('Submit', 'node_id', m.node_id);
    hex64('Submit', 'digest', m.digest);
    need(NONCE.test(m.nonce), 'Submit', 'nonce', 'must be 32 lowercase hex digits');
    need(m.round >= 0, 'Submit', 'round', 'must be >= 0');
    need(m.length >= 1, 'Submit', 'length', 'must be >= 1');
    need(m.samples >= 0, 'Submit', 'samples', 'must be >= 0');
    if (digestHex(payload) !== m.digest) throw new BadUpdate('Submit: digest does not match payload', 'digest');
  },
  Ack(m) {
    hex64('Ack', 'digest', m.digest);
    need(['accepted', 'duplicate'].includes(m.status), 'Ack', 'status', 'must be accepted or duplicate');
  },
  Error() {},
  RoundCommitted(m) { hex64('RoundCommitted', 'params_digest', m.params_digest); },
  Challenge(m) {
    hex64('Challenge', 'challenge', m.challenge);
    need(HEXSTR.test(m.server_public_key), 'Challenge', 'server_public_key', 'must be lowercase hex');
  },
  ValidateRequest(m, payload) {
    hex64('ValidateRequest', 'params_digest', m.params_digest);
    need(m.round >= 0, 'ValidateRequest', 'round', 'must be >= 0');
    need(m.length >= 1, 'ValidateRequest', 'length', 'must be >= 1');
    entries('ValidateRequest', 'candidates', m.candidates, { node_id: 's', digest: 's', offset: 'i', size: 'i' });
    for (const c of m.candidates) {
      need(c.offset >= 0 && c.size >= 0 && c.offset + c.size <= payload.length, 'ValidateRequest',
        'candidates', 'an entry lies outside the payload');
    }
  },
  Verdict(m) {
    hex64('Verdict', 'node_id', m.node_id);
    need(m.round >= 0, 'Verdict', 'round', 'must be >= 0');
    entries('Verdict', 'scores', m.scores, { node_id: 's', digest: 's', loss: 'f' });
  },
  Signal(m) {
    for (const name of ['node_id', 'to']) if (m[name] !== SERVER) hex64('Signal', name, m[name]);
    need(['offer', 'answer', 'candidate', 'bye'].includes(m.kind), 'Signal', 'kind', 'bad kind');
    need(NONCE.test(m.nonce), 'Signal', 'nonce', 'must be 32 lowercase hex digits');
  },
  Ready(m) {
    hex64('Ready', 'node_id', m.node_id);
    hex64('Ready', 'digest', m.digest);
    need(m.round >= 0, 'Ready', 'round', 'must be >= 0');
    need(m.length >= 1, 'Ready', 'length', 'must be >= 1');
    need(m.samples >= 0, 'Ready', 'samples', 'must be >= 0');
  },
  ShardPlan(m) {
    need(m.round >= 0, 'ShardPlan', 'round', 'must be >= 0');
    need(m.byzantine_fraction >= 0 && m.byzantine_fraction < 1, 'ShardPlan',
      'byzantine_fraction', 'must be in [0, 1)');
    need(['raw32', 'fp16', 'bf16'].includes(m.result_codec), 'ShardPlan', 'result_codec',
      'must be raw32, fp16 or bf16');
  },
  Shard(m, payload) {
    hex64('Shard', 'node_id', m.node_id);
    if (m.to !== SERVER) hex64('Shard', 'to', m.to);
    need(['part', 'result'].includes(m.kind), 'Shard', 'kind', 'must be part or result');
    need(m.round >= 0 && m.shard >= 0 && m.revision >= 0, 'Shard', 'shard',
      'round, shard and revision must be >= 0');
    need(payload.length > 0 && (m.kind !== 'part' || payload.length % 4 === 0), 'Shard', 'payload',
      'empty, or a part not float32 sized');
  },
};

/** Message.from_header: the header's fields checked against the type's schema. */
export function fromHeader(msgType, header, payload) {
  const [cls, schema] = SCHEMAS[msgType];
  const names = Object.keys(schema);
  const allowed = new Set(names.filter((n) => n !== 'payload'));
  const unknown = Object.keys(header).filter((k) => !allowed.has(k)).sort();
  if (unknown.length) throw new MessageError(`${cls}: unknown field(s) ${unknown}`, unknown[0]);
  for (const name of names) {
    if (name === 'payload') continue;
    if (!Object.hasOwn(header, name)) throw new MessageError(`${cls}: missing field '${name}'`, name);
    if (!typeOk(header, name, schema[name])) {
      throw new MessageError(`${cls}.${name}: expected ${schema[name]}, got ${JSON.stringify(header[name])}`.slice(0, 200), name);
    }
  }
  if (!('payload' in schema) && payload.length) throw new MessageError(`${cls} carries no payload`, 'payload');
  if ('nonce' in schema) need(NONCE.test(header.nonce), cls, 'nonce', 'must be 32 lowercase hex digits');
  POST[cls](header, payload);
  return { type: cls, msgType, fields: header, payload };
}

/** Frame (from decodeFrame) -> message; inflates a ZSTD payload with `zstd.decompress`. */
export function messageFromFrame(frame, { maxPayload = DEFAULT_MAX_PAYLOAD, zstd = null } = {}) {
  if (!(frame.msgType in SCHEMAS)) throw new MessageError(`unknown message type ${frame.msgType}`, 'msg_type');
  let { payload } = frame;
  if (frame.compressed) {
    if (!zstd) throw new FrameError('zstd payloads are not supported by this peer', 'flags');
    try {
      payload = zstd.decompress(payload, maxPayload);
    } catch (exc) {
      throw new FrameError(`bad zstd payload: ${exc.message}`, 'payload');
    }
  }
  return { ...fromHeader(frame.msgType, frame.header, payload), frame };
}

/** Frame bytes -> message. Throws only ProtocolError subclasses. */
export function decodeMessage(data, opts = {}) {
  return messageFromFrame(decodeFrame(data, opts), opts);
}

const ENTRY_FLOATS = { scores: ['loss'] };  // float keys inside list-of-dict fields
const asFloat = (v) => (typeof v === 'number' ? new PyFloat(v) : v);

/** The header as Python writes it: float fields as floats even when integral (30 -> 30.0);
 * JSON.parse cannot tell 30.0 from 30, the schema can. */
export function pythonTyped(msgType, fields) {
  const schema = SCHEMAS[msgType][1];
  const out = { ...fields };
  for (const [name, kind] of Object.entries(schema)) {
    if (!(name in out)) continue;
    if (kind === 'f' || kind === 'f?') out[name] = asFloat(out[name]);
    const keys = ENTRY_FLOATS[name];
    if (keys && Array.isArray(out[name])) {
      out[name] = out[name].map((e) => ({ ...e, ...Object.fromEntries(keys.filter((k) => k in e).map((k) => [k, asFloat(e[k])])) }));
    }
  }
  return out;
}

/** Message -> frame bytes; the payload is zstd-compressed when that saves >= 5%. */
export function encodeMessage(type, fields, payload = new Uint8Array(0), { sign = null, zstd = null } = {}) {
  const msgType = MESSAGE_TYPES[type];
  if (msgType === undefined) throw new Error(`unknown message type ${type}`);
  fromHeader(msgType, fields, payload);  // refuse what a receiver would refuse
  let flags = 0;
  if (zstd && payload.length >= COMPRESS_MIN) {
    const packed = zstd.compress(payload);
    if (packed.length <= 0.95 * payload.length) { payload = packed; flags = FLAG_ZSTD; }
  }
  return encodeFrame(msgType, pythonTyped(msgType, fields), payload, { flags, sign });
}

/** 16 random bytes, hex: the nonce every signed frame carries. */
export function newNonce() {
  return toHex(crypto.getRandomValues(new Uint8Array(16)));
}
