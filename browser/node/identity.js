// The browser node's identity: an ML-DSA-65 key pair (@noble/post-quantum, FIPS 204 pure
// mode, the run id's UTF-8 bytes as context), signing exactly what shared/envelope.py signs.
// The key pair lives in IndexedDB (database "daa-prime", store "keys"), so a tab keeps its
// node id across reloads.
//
//   const me = await loadOrCreateIdentity();           // {publicKey, secretKey, nodeId}
//   const bytes = encodeFrame(4, header, payload, {sign: signer(me, {runId, round, msgType, nonce})});
//   verifyFrame(frame, {publicKey, runId, nodeId});    // throws BadSignature / MessageError

import { sha256 } from '@noble/hashes/sha2.js';
import { ml_dsa65 } from '@noble/post-quantum/ml-dsa.js';

import { BadSignature, MessageError } from './errors.js';
import { fromHex, toHex } from './floatbits.js';

export const PUBLIC_KEY_LEN = 1952;
export const SECRET_KEY_LEN = 4032;
export const SIGNATURE_LEN = 3309;
const DOMAIN = new TextEncoder().encode('DAAP-SIG-v1');
const utf8 = new TextEncoder();
const NONCE_RE = /^[0-9a-f]{32}$/;

/** Node id = SHA-256 of the ML-DSA-65 public key, hex. */
export function nodeIdOf(publicKey) {
  return toHex(sha256(publicKey));
}

export function generateIdentity() {
  const { publicKey, secretKey } = ml_dsa65.keygen();
  return { publicKey, secretKey, nodeId: nodeIdOf(publicKey) };
}

/** The round a frame is signed for: its header's integer `round`, else -1. */
export function signRound(round) {
  return Number.isInteger(round) ? round : -1;
}

/** shared.envelope.signing_bytes: the canonical byte string a signature covers. */
export function signingBytes({ runId, round, nodeId, msgType, digest, nonce }) {
  const run = utf8.encode(runId);
  const nonceRaw = fromHex(nonce);
  const out = new Uint8Array(DOMAIN.length + 2 + run.length + 8 + 32 + 1 + 32 + 1 + nonceRaw.length);
  const dv = new DataView(out.buffer);
  let pos = 0;
  out.set(DOMAIN, pos); pos += DOMAIN.length;
  dv.setUint16(pos, run.length, true); pos += 2;
  out.set(run, pos); pos += run.length;
  dv.setBigInt64(pos, BigInt(round), true); pos += 8;
  out.set(fromHex(nodeId), pos); pos += 32;
  out[pos++] = msgType;
  out.set(digest, pos); pos += 32;
  out[pos++] = nonceRaw.length;
  out.set(nonceRaw, pos);
  return out;
}

const asContext = (c) => (typeof c === 'string' ? utf8.encode(c) : c);

/** ML-DSA-65 pure-mode signature; `context` is the run id (string) or its UTF-8 bytes. */
export function sign(secretKey, message, context) {
  return ml_dsa65.sign(message, secretKey, { context: asContext(context) });
}

export function verify(publicKey, message, signature, context) {
  if (publicKey.length !== PUBLIC_KEY_LEN || signature.length !== SIGNATURE_LEN) return false;
  try {
    return ml_dsa65.verify(signature, message, publicKey, { context: asContext(context) });
  } catch {
    return false;
  }
}

/** The `sign` callback encodeFrame wants for one frame (Identity.signer in Python). */
export function signer(identity, { runId, round, msgType, nonce }) {
  return (digest) => sign(identity.secretKey, signingBytes({
    runId, round: signRound(round), nodeId: identity.nodeId, msgType, digest, nonce,
  }), runId);
}

/** shared.envelope.verify_frame: check a decoded frame's signature; returns its nonce. */
export function verifyFrame(frame, { publicKey, runId, nodeId }) {
  if (!frame.signature) throw new BadSignature('this message must be signed', 'signature');
  const { nonce, round } = frame.header;
  if (typeof nonce !== 'string') throw new MessageError("signed frame needs a str field 'nonce'", 'nonce');
  if (!NONCE_RE.test(nonce)) throw new MessageError('nonce must be 32 lowercase hex digits', 'nonce');
  if (round != null && !(Number.isInteger(round) && round >= -1 && round < 2 ** 62)) {
    throw new MessageError('round must be an integer', 'round');
  }
  if (nodeIdOf(publicKey) !== nodeId) throw new BadSignature('node_id is not the SHA-256 of the public key', 'node_id');
  const msg = signingBytes({ runId, round: signRound(round), nodeId, msgType: frame.msgType, digest: frame.covered, nonce });
  if (!verify(publicKey, msg, frame.signature, runId)) {
    throw new BadSignature('signature does not verify for this node, run and frame', 'signature');
  }
  return nonce;
}

// -- IndexedDB persistence ----------------------------------------------------------------
const DB = 'daa-prime';
const STORE = 'keys';

function openDb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE);
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function request(db, mode, fn) {
  return new Promise((resolve, reject) => {
    const tx = db.transaction(STORE, mode);
    const req = fn(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(req.result);
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error);
  });
}

/** The key pair stored under `name`, or a new one (stored) when there is none. */
export async function loadOrCreateIdentity(name = 'node') {
  const db = await openDb();
  try {
    const stored = await request(db, 'readonly', (s) => s.get(name));
    if (stored && stored.publicKey?.length === PUBLIC_KEY_LEN && stored.secretKey?.length === SECRET_KEY_LEN) {
      return { publicKey: stored.publicKey, secretKey: stored.secretKey, nodeId: nodeIdOf(stored.publicKey) };
    }
    const id = generateIdentity();
    await request(db, 'readwrite', (s) => s.put({ publicKey: id.publicKey, secretKey: id.secretKey }, name));
    return id;
  } finally {
    db.close();
  }
}

/** Forget the key pair stored under `name` (a new node id on the next load). */
export async function forgetIdentity(name = 'node') {
  const db = await openDb();
  try {
    await request(db, 'readwrite', (s) => s.delete(name));
  } finally {
    db.close();
  }
}
