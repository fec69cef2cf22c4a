// A tab's direct data channels in a `p2p` run (the page's main thread: Chromium has no
// RTCPeerConnection in workers). The twin of native_node/mesh.py: one RTCPeerConnection and one
// ordered channel "p2p" per linked member; the smaller node id offers, the other answers;
// offers and answers are signed Signals through the server (which re-signs them as coming
// from the sender), each SDP with every candidate (aiortc ignores trickled ones). Frames use
// rtc.js's chunking (shared/rtc.py's format); received ones are reassembled and their SHA-256
// checked here, then handed to the participant worker (p2p_glue.py).
//
// A tab links only to the members p2p_glue.py names (shared.p2p_mesh.direct_peers: at most
// TAB_MAX_PEERS); a frame for any other member, or for one whose channel is not open within
// timeoutS, goes on the WebSocket and the server forwards it (counted on both ends).
//
//   const mesh = new TabMesh(me, (to, kind, data) => signal(to, kind, data), onFrame, opts);
//   mesh.link(peers, iceServers);           // a round's plan: open what is missing
//   await mesh.onSignal(from, kind, data);  // offers / answers from the server
//   if (!(await mesh.send(peer, frame))) ws.send(frame);

import { sha256 } from '@noble/hashes/sha2.js';
import { DIGEST_LEN, HEADER_LEN, KIND_CANCEL, iceConfig, pairType, sendFrame } from './rtc.js';

const MAX_FRAME = 64 * 1024 * 1024;

/** Reassembles the chunks of one channel (shared.rtc's format) into verified frames. */
export class Reassembler {
  constructor(onFrame, maxFrame = MAX_FRAME) {
    this.onFrame = onFrame;
    this.maxFrame = maxFrame;
    this.cur = null;
    this.bad = 0;
  }

  push(buf) {
    const b = new Uint8Array(buf);
    if (b.length < HEADER_LEN || b[0] !== 0x44 || b[1] !== 0x43) { this.bad++; return; }
    const v = new DataView(buf);
    const kind = b[3];
    const id = v.getUint32(4, true);
    const idx = v.getUint32(8, true);
    const n = v.getUint32(12, true);
    const total = v.getUint32(16, true);
    if (kind === KIND_CANCEL) { if (this.cur && this.cur.id === id) this.cur = null; return; }
    if (idx === 0) {
      if (total > this.maxFrame || n < 1) { this.bad++; this.cur = null; return; }
      this.cur = { id, n, total, next: 0, off: 0, digest: b.slice(HEADER_LEN, HEADER_LEN + DIGEST_LEN),
        frame: new Uint8Array(total) };
    }
    const c = this.cur;
    if (!c || c.id !== id || idx !== c.next) { this.bad++; this.cur = null; return; }
    const data = b.subarray(idx === 0 ? HEADER_LEN + DIGEST_LEN : HEADER_LEN);
    if (c.off + data.length > c.total) { this.bad++; this.cur = null; return; }
    c.frame.set(data, c.off);
    c.off += data.length;
    c.next++;
    if (c.next < c.n) return;
    this.cur = null;
    const d = sha256(c.frame);
    if (c.off !== c.total || !d.every((x, i) => x === c.digest[i])) { this.bad++; return; }
    this.onFrame(c.frame);
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

export class TabMesh {
  constructor(me, sendSignal, onFrame, { timeoutS = 10, iceServers = [] } = {}) {
    this.me = me;
    this.sendSignal = sendSignal;  // (to, kind, data) -> a signed Signal through the server
    this.onFrame = onFrame;        // (peer, Uint8Array frame)
    this.timeoutS = timeoutS;
    this.iceServers = iceServers;
    this.peers = new Map();        // peer -> {pc, channel, open: Promise<bool>, settle}
    this.wanted = new Set();       // the peers this tab links to (the latest plan's)
    this.nextTransfer = 1;
    this.stats = { direct: 0, relayed: 0, links: 0, failed: 0, pairs: {}, maxBuffered: 0 };
  }

  offersTo(peer) { return this.me < peer; }

  entry(peer) {
    let e = this.peers.get(peer);
    if (!e) {
      e = { pc: null, channel: null, state: 'new' };
      e.open = new Promise((resolve) => { e.settle = resolve; });
      this.peers.set(peer, e);
      setTimeout(() => {
        if (e.state !== 'open') { e.state = 'failed'; this.stats.failed++; e.settle(false); }
      }, this.timeoutS * 1000);
    }
    return e;
  }

  /** The plan's direct peers: offer to those this tab offers to (the others offer to us). */
  link(peers, iceServers = this.iceServers) {
    this.iceServers = iceServers;
    for (const p of peers) {
      this.wanted.add(p);
      if (this.peers.get(p)?.state === 'closed') this.drop(p);  // it left and came back
      const e = this.entry(p);
      if (this.offersTo(p) && e.state === 'new') {
        e.state = 'offering';
        this.offer(p, e).catch(() => { e.state = 'failed'; e.settle(false); });
      }
    }
  }

  newPc(peer, e) {
    const pc = new RTCPeerConnection({ iceServers: iceConfig(this.iceServers) });
    e.pc = pc;
    return pc;
  }

  attach(peer, e, channel) {
    channel.binaryType = 'arraybuffer';
    e.channel = channel;
    const re = new Reassembler((frame) => this.onFrame(peer, frame));
    channel.onmessage = (ev) => re.push(ev.data);
    channel.addEventListener('open', () => {
      e.state = 'open';
      this.stats.links++;
      e.settle(true);
      e.open = Promise.resolve(true);  // also after a failed first try (a fresh offer came)
      pairType(e.pc).then((pair) => {
        if (!pair) return;
        this.stats.pairs[peer] = pair;
        this.sendSignal('server', 'path', JSON.stringify({ peer, pair }));
      }).catch(() => {});
    });
    channel.addEventListener('close', () => { if (e.channel === channel) e.state = 'closed'; });
  }

  async offer(peer, e) {
    const pc = this.newPc(peer, e);
    this.attach(peer, e, pc.createDataChannel('p2p', { ordered: true }));
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc, 3000);
    this.sendSignal(peer, 'offer', pc.localDescription.sdp);
  }

  /** A Signal the server forwarded from `peer`. Offers from members outside this tab's
   * bounded set are declined (the peer relays through the server after its timeout). */
  async onSignal(peer, kind, data) {
    if (kind === 'offer') {
      if (this.offersTo(peer) || !this.wanted.has(peer)) return;
      const e = this.entry(peer);
      if (e.pc) { try { e.pc.close(); } catch { /* gone */ } }
      const pc = this.newPc(peer, e);
      e.state = 'answering';
      pc.ondatachannel = (ev) => this.attach(peer, e, ev.channel);
      await pc.setRemoteDescription({ type: 'offer', sdp: data });
      await pc.setLocalDescription(await pc.createAnswer());
      await gathered(pc, 3000);
      this.sendSignal(peer, 'answer', pc.localDescription.sdp);
    } else if (kind === 'answer') {
      const e = this.peers.get(peer);
      if (e?.pc && e.pc.signalingState === 'have-local-offer') {
        await e.pc.setRemoteDescription({ type: 'answer', sdp: data });
      }
    } else if (kind === 'bye') {
      this.drop(peer);
    }
  }

  /** One frame to `peer` over its channel (waiting for it to open, up to timeoutS); false
   * when there is none: the caller relays through the server. */
  send(peer, frame) {
    if (!this.wanted.has(peer)) { this.stats.relayed += frame.length; return Promise.resolve(false); }
    const e = this.entry(peer);
    // one frame at a time per channel: the chunks of two frames must not interleave
    const next = (e.queue || Promise.resolve()).then(() => this.sendNow(e, frame));
    e.queue = next.catch(() => false);
    return next;
  }

  async sendNow(e, frame) {
    const ok = await e.open;
    if (!ok || e.state !== 'open' || e.channel?.readyState !== 'open') {
      this.stats.relayed += frame.length;
      return false;
    }
    try {
      await sendFrame(e.channel, frame, this.nextTransfer++ >>> 0);
      this.stats.maxBuffered = Math.max(this.stats.maxBuffered, e.channel.bufferedAmount);
      this.stats.direct += frame.length;
      return true;
    } catch {
      this.stats.relayed += frame.length;
      return false;
    }
  }

  drop(peer) {
    const e = this.peers.get(peer);
    this.peers.delete(peer);
    if (e?.pc) { try { e.pc.close(); } catch { /* gone */ } }
  }

  /** Channels open right now. */
  get open() { return [...this.peers.values()].filter((e) => e.state === 'open').length; }

  close() { for (const p of [...this.peers.keys()]) this.drop(p); }
}
