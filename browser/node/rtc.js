// WebRTC from the tab: the data-channel framing of shared/rtc.py (chunks under the 256 KiB
// message limit, the frame's SHA-256 in chunk 0, backpressure on bufferedAmount) and the
// `star` uplink to the server's aiortc peer (transport/rtc.py's StarUplink, in JS).
//
//   const up = new StarUplink((kind, data) => signal(kind, data), { timeoutS: 10, iceServers });
// iceServers: the Welcome's ice_servers (the run's STUN/TURN, TURN credentials minted for
// this tab); once open, the selected candidate pair's type goes to the server (Signal 'path').
//   await up.start();             // offer (all candidates in the SDP) -> signed Signal
//   await up.onAnswer(sdp);       // the server peer's answer
//   if (!(await up.send(frame))) ws.send(frame);   // relay fallback

import { sha256 } from '@noble/hashes/sha2.js';

export const MAGIC = [0x44, 0x43];  // "DC"
export const VERSION = 1;
export const KIND_DATA = 0;
export const KIND_CANCEL = 1;
export const HEADER_LEN = 20;
export const DIGEST_LEN = 32;
export const MAX_MESSAGE = 256 * 1024;
export const CHUNK_DATA = MAX_MESSAGE - HEADER_LEN - DIGEST_LEN;
const HIGH_WATER = 4 * 1024 * 1024;  // pause sending above this much buffered
const LOW_WATER = 1024 * 1024;

function header(kind, transferId, index, n, total) {
  const h = new Uint8Array(HEADER_LEN);
  const v = new DataView(h.buffer);
  h[0] = MAGIC[0]; h[1] = MAGIC[1]; h[2] = VERSION; h[3] = kind;
  v.setUint32(4, transferId, true); v.setUint32(8, index, true);
  v.setUint32(12, n, true); v.setUint32(16, total, true);
  return h;
}

/** The chunks of one frame, in order (shared.rtc.chunks, byte for byte). */
export function* chunks(frame, transferId, chunkData = CHUNK_DATA) {
  const total = frame.length;
  const n = Math.max(1, Math.ceil(total / chunkData));
  const digest = sha256(frame);
  for (let i = 0; i < n; i++) {
    const data = frame.subarray(i * chunkData, (i + 1) * chunkData);
    const head = header(KIND_DATA, transferId, i, n, total);
    const out = new Uint8Array(HEADER_LEN + (i === 0 ? DIGEST_LEN : 0) + data.length);
    out.set(head, 0);
    if (i === 0) out.set(digest, HEADER_LEN);
    out.set(data, out.length - data.length);
    yield out;
  }
}

/** The bytes a frame of `length` puts in a channel's buffer (its chunks' headers included). */
export function wireBytes(length, chunkData = CHUNK_DATA) {
  return length + HEADER_LEN * Math.max(1, Math.ceil(length / chunkData)) + DIGEST_LEN;
}

export function cancelChunk(transferId) { return header(KIND_CANCEL, transferId, 0, 0, 0); }

/** Send one frame over an open RTCDataChannel, chunked, waiting while too much is buffered. */
export async function sendFrame(channel, frame, transferId) {
  channel.bufferedAmountLowThreshold = LOW_WATER;
  for (const chunk of chunks(frame, transferId)) {
    if (channel.readyState !== 'open') throw new Error(`data channel ${channel.readyState}`);
    if (channel.bufferedAmount > HIGH_WATER) {
      await new Promise((resolve) => {
        const done = () => { channel.removeEventListener('bufferedamountlow', done); channel.removeEventListener('close', done); resolve(); };
        channel.addEventListener('bufferedamountlow', done);
        channel.addEventListener('close', done);
      });
    }
    channel.send(chunk);
  }
}

function gathered(pc, timeoutMs) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const t = setTimeout(resolve, timeoutMs);
    pc.addEventListener('icegatheringstatechange', () => {
      if (pc.iceGatheringState === 'complete') { clearTimeout(t); resolve(); }
    });
  });
}

/** Welcome.ice_servers ({urls, username, credential}; empty strings for STUN) as an
 * RTCConfiguration's iceServers (Chromium refuses empty credentials on a TURN entry). */
export function iceConfig(servers = []) {
  return servers.map((s) => (s.username || s.credential
    ? { urls: s.urls, username: s.username, credential: s.credential } : { urls: s.urls }));
}

const PAIR_RANK = { host: 0, srflx: 1, prflx: 1, relay: 2 };

/** The type of the candidate pair `pc` selected: "relay" when either end is a TURN relay,
 * "srflx" when either is server- or peer-reflexive, else "host"; null before one is. */
export async function pairType(pc) {
  const stats = await pc.getStats();
  let pair = null;
  stats.forEach((r) => {
    if (r.type === 'transport' && r.selectedCandidatePairId) pair = stats.get(r.selectedCandidatePairId);
  });
  if (!pair) stats.forEach((r) => { if (r.type === 'candidate-pair' && r.nominated && r.state === 'succeeded') pair = r; });
  if (!pair) return null;
  const kinds = [stats.get(pair.localCandidateId), stats.get(pair.remoteCandidateId)]
    .map((c) => c?.candidateType ?? 'host');
  const worst = kinds.reduce((a, b) => ((PAIR_RANK[b] ?? 1) > (PAIR_RANK[a] ?? 1) ? b : a));
  return worst === 'prflx' ? 'srflx' : worst;
}

export class StarUplink {
  constructor(sendSignal, { timeoutS = 10, iceServers = [] } = {}) {
    this.sendSignal = sendSignal;  // (kind, sdp) -> a signed Signal to "server"
    this.timeoutS = timeoutS;
    this.pc = new RTCPeerConnection({ iceServers: iceConfig(iceServers) });
    this.channel = this.pc.createDataChannel('updates', { ordered: true });
    this.channel.binaryType = 'arraybuffer';
    this.fellBack = false;
    this.opened = false;  // the channel did open (stream_pump.js offers a new one after)
    this.nextTransfer = 1;
    this.pair = null;  // the selected candidate pair's type, once open
    this.decided = new Promise((resolve) => { this.decide = resolve; });
    this.channel.addEventListener('open', () => {
      this.opened = true;
      this.decide(true);
      pairType(this.pc).then((pair) => {  // for /api/peers (ice_pairs)
        this.pair = pair;
        if (pair) this.sendSignal('path', JSON.stringify({ peer: 'server', pair }));
      }).catch(() => {});
    });
  }

  /** Offer (non-trickle: aiortc reads every candidate from the SDP), then wait for the
   * channel up to timeoutS; after that, updates are relayed over the WebSocket. */
  async start() {
    await this.pc.setLocalDescription(await this.pc.createOffer());
    await gathered(this.pc, 3000);
    this.sendSignal('offer', this.pc.localDescription.sdp);
    setTimeout(() => {
      if (this.channel.readyState !== 'open') { this.fellBack = true; this.decide(false); }
    }, this.timeoutS * 1000);
  }

  async onAnswer(sdp) { await this.pc.setRemoteDescription({ type: 'answer', sdp }); }

  get state() {
    if (this.channel.readyState === 'open' && !this.fellBack) return 'webrtc';
    return this.fellBack ? 'relay' : 'connecting';
  }

  /** True when the frame went over the channel; false: the caller relays it. */
  async send(frame) {
    await this.decided;
    if (this.fellBack || this.channel.readyState !== 'open') return false;
    try {
      await sendFrame(this.channel, frame, this.nextTransfer++ >>> 0);
      return true;
    } catch {
      this.fellBack = true;
      return false;
    }
  }

  close() { try { this.pc.close(); } catch { /* already closed */ } }
}
