// The versioned binary frame (docs/protocol.md, "Frame"), as shared/frame.py reads and
// writes it: 16-byte fixed header, canonical JSON header, payload, optional signature trailer.
//
//   const bytes = encodeFrame(4, header, payload, {sign: (digest) => signature});
//   const f = decodeFrame(bytes);  // {version, msgType, flags, header, payload, signature, covered}
//
// decodeFrame throws FrameError / FrameTooLarge / UnsupportedVersion with Python's `field`;
// lengths are checked against the limits before anything past the fixed 16 bytes is read.

import { sha256 } from '@noble/hashes/sha2.js';

import { FrameError, FrameTooLarge, UnsupportedVersion } from './errors.js';

export const MAGIC = Uint8Array.of(0x44, 0x41, 0x41, 0x50);  // "DAAP"
export const PROTOCOL_VERSION = 1;
export const FIXED_LEN = 16;
export const MAX_HEADER_LEN = 64 * 1024;
export const DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024;
export const MAX_SIGNATURE_LEN = 8192;
export const FLAG_SIGNED = 0x0001;
export const FLAG_ZSTD = 0x0002;
const KNOWN_FLAGS = FLAG_SIGNED | FLAG_ZSTD;
const utf8 = new TextEncoder();
const strictUtf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/** A JS number that must travel as a Python float even when integral (30 -> "30.0"). */
export class PyFloat {
  constructor(value) { this.value = value; }
  valueOf() { return this.value; }
}

const isWellFormed = (s) => (typeof s.isWellFormed === 'function' ? s.isWellFormed()
  : !/[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?:^|[^\uD800-\uDBFF])[\uDC00-\uDFFF]/.test(s));

/** Python's repr() of a float, which json.dumps writes: "0.001", "1e-05", "1.5e+16". */
export function pyFloatRepr(x) {
  if (!Number.isFinite(x)) throw new FrameError('header is not canonical JSON: NaN or infinity', 'header');
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0';
  const [mant, exp] = Math.abs(x).toExponential().split('e');  // shortest round-trip digits
  const digits = mant.replace('.', '');
  const decpt = Number(exp) + 1;
  let s;
  if (decpt <= -4 || decpt > 16) {
    const e = decpt - 1;
    s = `${digits[0]}${digits.length > 1 ? `.${digits.slice(1)}` : ''}e${e < 0 ? '-' : '+'}${String(Math.abs(e)).padStart(2, '0')}`;
  } else if (decpt <= 0) {
    s = `0.${'0'.repeat(-decpt)}${digits}`;
  } else if (decpt >= digits.length) {
    s = `${digits}${'0'.repeat(decpt - digits.length)}.0`;
  } else {
    s = `${digits.slice(0, decpt)}.${digits.slice(decpt)}`;
  }
  return x < 0 ? `-${s}` : s;
}

function byCodePoint(a, b) {  // Python's str ordering (JS sorts by UTF-16 units)
  const ia = a[Symbol.iterator]();
  const ib = b[Symbol.iterator]();
  for (;;) {
    const x = ia.next();
    const y = ib.next();
    if (x.done || y.done) return (x.done ? 0 : 1) - (y.done ? 0 : 1);
    const d = x.value.codePointAt(0) - y.value.codePointAt(0);
    if (d) return d;
  }
}

function jsonText(v) {
  if (v === null) return 'null';
  if (v === true) return 'true';
  if (v === false) return 'false';
  if (typeof v === 'bigint') return v.toString();
  if (v instanceof PyFloat) return pyFloatRepr(v.value);
  if (typeof v === 'number') {
    if (!Number.isFinite(v)) throw new FrameError('header is not canonical JSON: NaN or infinity', 'header');
    return Number.isInteger(v) ? BigInt(v).toString() : pyFloatRepr(v);
  }
  if (typeof v === 'string') {
    if (!isWellFormed(v)) throw new FrameError('header holds a lone surrogate', 'header');
    return JSON.stringify(v);  // escapes exactly as json.dumps(ensure_ascii=False)
  }
  if (Array.isArray(v)) return `[${v.map(jsonText).join(',')}]`;
  if (typeof v === 'object') {
    const keys = Object.keys(v).sort(byCodePoint);
    return `{${keys.map((k) => `${jsonText(k)}:${jsonText(v[k])}`).join(',')}}`;
  }
  throw new FrameError(`header holds a ${typeof v}`, 'header');
}

/** The one JSON encoding on the wire (shared.frame.canonical_json), as UTF-8 bytes. */
export function canonicalJson(obj) {
  return utf8.encode(jsonText(obj));
}

/** Build one frame. `sign(sha256(frame without trailer))` -> signature adds the trailer. */
export function encodeFrame(msgType, header, payload = new Uint8Array(0),
  { version = PROTOCOL_VERSION, flags = 0, sign = null } = {}) {
  if (flags & ~KNOWN_FLAGS) throw new FrameError(`unknown flag bits ${flags}`, 'flags');
  if (!(Number.isInteger(msgType) && msgType >= 0 && msgType <= 255)) {
    throw new FrameError(`message type ${msgType} out of range 0..255`, 'msg_type');
  }
  const head = canonicalJson(header);
  if (head.length > MAX_HEADER_LEN) {
    throw new FrameTooLarge(`header ${head.length} bytes > limit ${MAX_HEADER_LEN}`, 'header');
  }
  if (sign) flags |= FLAG_SIGNED;
  const body = new Uint8Array(FIXED_LEN + head.length + payload.length);
  const dv = new DataView(body.buffer);
  body.set(MAGIC, 0);
  dv.setUint8(4, version);
  dv.setUint8(5, msgType);
  dv.setUint16(6, flags, true);
  dv.setUint32(8, head.length, true);
  dv.setUint32(12, payload.length, true);
  body.set(head, FIXED_LEN);
  body.set(payload, FIXED_LEN + head.length);
  if (!sign) return body;
  const signature = sign(sha256(body));
  if (signature.length > MAX_SIGNATURE_LEN) {
    throw new FrameTooLarge(`signature ${signature.length} bytes > ${MAX_SIGNATURE_LEN}`, 'signature');
  }
  const out = new Uint8Array(body.length + 2 + signature.length);
  out.set(body, 0);
  new DataView(out.buffer).setUint16(body.length, signature.length, true);
  out.set(signature, body.length + 2);
  return out;
}

// Numbers whose JSON text has a '.' or an exponent are Python floats even when integral
// ("5.0"): remembered per holder object, so that an int field can refuse them as Python does.
const FLOAT_TEXT = new WeakMap();

/** Whether `holder[key]` was written as a float literal (needs JSON.parse source access). */
export function isFloatLiteral(holder, key) {
  return FLOAT_TEXT.get(holder)?.has(String(key)) ?? false;
}

function reviver(key, value, context) {
  if (typeof value === 'number' && context && /[.eE]/.test(context.source)) {
    let keys = FLOAT_TEXT.get(this);
    if (!keys) FLOAT_TEXT.set(this, (keys = new Set()));
    keys.add(key);
  }
  return value;
}

/** The number literals of a JSON text, in document order (strings skipped). */
function numberTokens(text) {
  const out = [];
  for (let i = 0; i < text.length;) {
    const c = text[i];
    if (c === '"') {
      for (i += 1; i < text.length && text[i] !== '"'; i += text[i] === '\\' ? 2 : 1);
      i += 1;
    } else if (c === '-' || (c >= '0' && c <= '9')) {
      const m = /^-?[0-9.eE+-]+/.exec(text.slice(i, i + 64));
      out.push(m[0]);
      i += m[0].length;
    } else {
      i += 1;
    }
  }
  return out;
}

/** Whether `text` is byte for byte the canonical encoding of the `parsed` object
 * (shared.frame.parse_header): keys sorted and unique, no whitespace, strings as json.dumps
 * writes them, each number as Python writes its int or its float. JSON.parse cannot tell 5
 * from 5.0, so each number is checked against its own literal in the text. */
function isCanonical(text, parsed) {
  const tokens = numberTokens(text);
  let next = 0;
  let ok = true;
  const write = (v) => {
    if (typeof v === 'number') {
      const tok = tokens[next++];
      // an int literal beyond 2^53 parses inexactly: canonical when written as Python
      // writes ints (the message schema refuses its value, as in Python)
      const asInt = Number.isInteger(v) && /^-?(0|[1-9][0-9]*)$/.test(tok ?? '')
        && Number(tok) === v;
      if (!asInt && tok !== pyFloatRepr(v)) ok = false;
      return tok ?? '';
    }
    if (v === null || typeof v !== 'object') return jsonText(v);
    if (Array.isArray(v)) return `[${v.map(write).join(',')}]`;
    const keys = Object.keys(v).sort(byCodePoint);
    return `{${keys.map((k) => `${jsonText(k)}:${write(v[k])}`).join(',')}}`;
  };
  const again = write(parsed);
  return ok && next === tokens.length && again === text;
}

function firstUnencodable(obj) {
  const stack = [obj];
  while (stack.length) {
    const item = stack.pop();
    if (typeof item === 'string') {
      if (!isWellFormed(item)) return 'a lone surrogate in a string';
    } else if (typeof item === 'number') {
      if (!Number.isFinite(item)) return 'a number out of the float range';
    } else if (Array.isArray(item)) {
      stack.push(...item);
    } else if (item && typeof item === 'object') {
      for (const [k, v] of Object.entries(item)) stack.push(k, v);
    }
  }
  return null;
}

/** Parse and validate one frame. Throws only FrameError and its subclasses. */
export function decodeFrame(data, { maxPayload = DEFAULT_MAX_PAYLOAD } = {}) {
  if (!(data instanceof Uint8Array)) throw new FrameError('frame must be a Uint8Array');
  if (data.length < FIXED_LEN) {
    throw new FrameError(`truncated frame: ${data.length} bytes < fixed header ${FIXED_LEN}`);
  }
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (MAGIC.some((b, i) => data[i] !== b)) throw new FrameError('bad magic, expected DAAP', 'magic');
  const version = data[4];
  const msgType = data[5];
  const flags = dv.getUint16(6, true);
  const headLen = dv.getUint32(8, true);
  const payLen = dv.getUint32(12, true);
  if (version !== PROTOCOL_VERSION) {
    throw new UnsupportedVersion(`frame speaks protocol version ${version}; this peer speaks `
      + `version ${PROTOCOL_VERSION}`, 'version');
  }
  if (flags & ~KNOWN_FLAGS) throw new FrameError(`unknown flag bits ${flags}`, 'flags');
  if (headLen > MAX_HEADER_LEN) throw new FrameTooLarge(`header ${headLen} bytes > limit`, 'header_len');
  if (payLen > maxPayload) throw new FrameTooLarge(`payload ${payLen} bytes > limit ${maxPayload}`, 'payload_len');
  const end = FIXED_LEN + headLen + payLen;
  let signature = null;
  if (flags & FLAG_SIGNED) {
    if (data.length < end + 2) throw new FrameError('signed frame too short for its trailer', 'length');
    const sigLen = dv.getUint16(end, true);
    if (sigLen > MAX_SIGNATURE_LEN) throw new FrameTooLarge(`signature ${sigLen} bytes > limit`, 'signature');
    if (data.length !== end + 2 + sigLen) {
      throw new FrameError(`frame is ${data.length} bytes but declares ${end}+2+${sigLen}`, 'length');
    }
    signature = data.slice(end + 2);
  } else if (data.length !== end) {
    throw new FrameError(`frame is ${data.length} bytes but declares ${end}`, 'length');
  }
  let header;
  let text;
  try {
    text = strictUtf8.decode(data.subarray(FIXED_LEN, FIXED_LEN + headLen));
    header = JSON.parse(text, reviver);
  } catch (exc) {
    throw new FrameError(`header is not UTF-8 JSON: ${exc.message}`, 'header');
  }
  if (header === null || typeof header !== 'object' || Array.isArray(header)) {
    throw new FrameError('header must be a JSON object', 'header');
  }
  const badValue = firstUnencodable(header);
  if (badValue) throw new FrameError(`header holds ${badValue}: not canonical JSON`, 'header');
  if (!isCanonical(text, header)) {
    throw new FrameError('header is not canonical JSON (keys sorted and unique, no whitespace, '
      + 'numbers and strings as canonical_json writes them)', 'header');
  }
  return {
    version, msgType, flags, header,
    payload: data.slice(FIXED_LEN + headLen, end),
    signature,
    covered: signature ? sha256(data.subarray(0, end)) : new Uint8Array(0),
    compressed: Boolean(flags & FLAG_ZSTD),
  };
}
