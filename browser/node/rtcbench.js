// Data-channel throughput from a tab (bench/transport.py): one RTCPeerConnection per page,
// frames chunked as shared/rtc.py does (rtc.js), the receiving page reassembles and checks
// the SHA-256. Times are Date.now() (shared by the pages of one browser).

import { sha256 } from '@noble/hashes/sha2.js';
import { DIGEST_LEN, HEADER_LEN, sendFrame } from './rtc.js';

let pc = null;
let channel = null;
let received = [];   // completed transfers: {bytes, ms, ok}
let current = null;

function onChunk(buf) {
  const b = new Uint8Array(buf);
  const v = new DataView(buf);
  const idx = v.getUint32(8, true);
  const n = v.getUint32(12, true);
  const total = v.getUint32(16, true);
  if (idx === 0) {
    current = { digest: b.slice(HEADER_LEN, HEADER_LEN + DIGEST_LEN), parts: [], size: 0, total };
    const data = b.subarray(HEADER_LEN + DIGEST_LEN);
    current.parts.push(data.slice()); current.size += data.length;
  } else {
    const data = b.subarray(HEADER_LEN);
    current.parts.push(data.slice()); current.size += data.length;
  }
  if (idx === n - 1) {
    const frame = new Uint8Array(current.total);
    let off = 0;
    for (const p of current.parts) { frame.set(p, off); off += p.length; }
    const ok = current.size === current.total && sha256(frame).every((x, i) => x === current.digest[i]);
    received.push({ bytes: current.total, at: Date.now(), ok });
    current = null;
  }
}

function setup(ch) {
  channel = ch;
  channel.binaryType = 'arraybuffer';
  channel.onmessage = (ev) => onChunk(ev.data);
}

async function gathered() {
  if (pc.iceGatheringState === 'complete') return;
  await new Promise((resolve) => {
    pc.addEventListener('icegatheringstatechange', () => { if (pc.iceGatheringState === 'complete') resolve(); });
    setTimeout(resolve, 3000);
  });
}

window.rtcBench = {
  async offer() {
    pc = new RTCPeerConnection({ iceServers: [] });
    setup(pc.createDataChannel('bench', { ordered: true }));
    await pc.setLocalDescription(await pc.createOffer());
    await gathered();
    return pc.localDescription.sdp;
  },
  async answer(sdp) {
    pc = new RTCPeerConnection({ iceServers: [] });
    pc.ondatachannel = (ev) => setup(ev.channel);
    await pc.setRemoteDescription({ type: 'offer', sdp });
    await pc.setLocalDescription(await pc.createAnswer());
    await gathered();
    return pc.localDescription.sdp;
  },
  async accept(sdp) { await pc.setRemoteDescription({ type: 'answer', sdp }); },
  open() { return !!channel && channel.readyState === 'open'; },
  /** Send `size` random bytes as one frame; resolves when the last chunk is handed to the
   * channel, with the start time. */
  async send(size, transferId) {
    const frame = new Uint8Array(size);
    for (let i = 0; i < size; i += 65536) crypto.getRandomValues(frame.subarray(i, Math.min(size, i + 65536)));
    const start = Date.now();
    await sendFrame(channel, frame, transferId);
    return start;
  },
  received() { return received; },
};
