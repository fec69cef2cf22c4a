// The participant's protocol logic in a dedicated Web Worker, so that nothing heavy runs on
// the page's main thread: Pyodide (loading the runtime, unpacking `shared`, importing it),
// shared/participant.py (frame checks, params digests, codec + error feedback), ML-DSA-65
// signing and zstd. The page (node.js, through participant_client.js) keeps the WebSocket and
// the WebRTC uplink (RTCPeerConnection does not exist in Chromium's workers) and passes frames
// here and back as transferred buffers.
//
// Loaded from /static/worker/node/ (server/browser_assets.py): workers get no import map, so
// the server rewrites the bare specifiers of these modules (@noble/..., fzstd) to URLs.
//
// Messages in:                                            Messages out:
//   {type:'init', prefix, role, backend, pins, journal}   {type:'ready', nodeId, restored, timings}
//   {type:'call', id, fn, args}                           {type:'result', id, events | error}
//                                                         {type:'pins', json} (save the pins)
//                                                         {type:'error', message} (init failed)
// fn: connected() | feed(frame) | submit(round, delta, trainLoss, samples, computeS) |
//     verdict(round, base, losses) | signal(kind, data, to) | stopped(round) | setLayout(json) |
//     streamNext(pump) | streamAgain() (a streamed update's chunks, one at a time: node_glue.py) |
//     link(peer, frame) (a frame on a p2p peer's data channel: p2p_glue.py) |
//     dhtStart/dhtFind/dhtLink/dhtUndelivered/dhtSync (the tab's DHT carrier: dht_glue.py);
// {type:'events', events} out: events the DHT carrier posts between calls (dht_glue.py);
// `events` are node_glue.py's (plain objects, bytes as Uint8Array).

import { loadShared } from './pyodide_host.js';
import { loadOrCreateIdentity } from './identity.js';
import { initZstd } from './zstd.js';

let glue = null;
let part = null;

const CALLS = {
  connected: () => { part.connection_made(); return []; },
  feed: (frame) => glue.feed(part, frame),
  submit: (round, delta, trainLoss, samples, computeS) => glue.submit(part, round, delta, trainLoss,
    samples, computeS),
  verdict: (round, base, losses) => glue.verdict(part, round, base, losses),
  signal: (kind, data, to) => glue.signal(part, kind, data, to ?? 'server'),
  link: (peer, frame) => glue.link(part, peer, frame),  // a frame on a p2p peer's channel
  lie: (round) => { glue.lie(part, round); return []; },  // fault injection (e2e tests)
  cap: (n) => { glue.cap(part, n); return []; },  // p2p: at most n direct channels
  stopped: (round) => { glue.stopped(part, round); return []; },
  streamNext: (pump) => glue.streamNext(part, pump),  // one Chunk frame (stream_pump.js)
  streamAgain: () => glue.streamAgain(part),  // the StreamSubmit again, fresh nonce
  setLayout: (json) => { glue.setLayout(part, json); return []; },
  // the tab's Kademlia carrier (dht_glue.py)
  dhtStart: (runId, channels) => { glue.dht.start(part, runId, channels); return []; },
  dhtFind: (target, req) => { glue.dht.find(part, target, req); return []; },
  dhtLink: (peer, frame) => { glue.dht.link(part, peer, frame); return []; },
  dhtUndelivered: (peer, frame) => { glue.dht.undelivered(part, peer, frame); return []; },
  dhtSync: (open, relayUp) => glue.dht.sync(part, open, relayUp),
};

/** The events' own byte buffers, moved to the page instead of copied. */
function transferables(events) {
  const out = new Set();
  for (const e of events) {
    for (const v of Object.values(e)) {
      if (v instanceof Uint8Array && v.byteOffset === 0 && v.byteLength === v.buffer.byteLength) out.add(v.buffer);
    }
  }
  return [...out];
}

async function init({ prefix, role, backend, pins, journal }) {
  const t0 = performance.now();
  const [shared, ident] = await Promise.all([
    loadShared(), loadOrCreateIdentity(`${prefix}node`), initZstd()]);
  const py = shared.pyodide;
  const resp = await fetch(new URL('./node_glue.py', import.meta.url), { cache: 'no-cache' });
  if (!resp.ok) throw new Error(`node_glue.py: HTTP ${resp.status}`);
  py.runPython(await resp.text(), { filename: 'node_glue.py' });
  const p2p = await fetch(new URL('./p2p_glue.py', import.meta.url), { cache: 'no-cache' });
  if (!p2p.ok) throw new Error(`p2p_glue.py: HTTP ${p2p.status}`);
  py.runPython(await p2p.text(), { filename: 'p2p_glue.py' });  // sets node_glue's P2P_HOOK
  const dht = await fetch(new URL('./dht_glue.py', import.meta.url), { cache: 'no-cache' });
  if (!dht.ok) throw new Error(`dht_glue.py: HTTP ${dht.status}`);
  py.runPython(await dht.text(), { filename: 'dht_glue.py' });  // sets node_glue's DHT_HOOK
  const get = (name) => py.globals.get(name);
  glue = { make: get('make_participant'), feed: get('feed'), submit: get('submit'),
    setLayout: get('set_layout'), verdict: get('verdict'), signal: get('signal'),
    stopped: get('training_stopped'), link: get('p2p_link'), lie: get('p2p_lie'),
    cap: get('p2p_cap'), streamNext: get('stream_next'), streamAgain: get('stream_again'),
    dht: { start: get('dht_start'), find: get('dht_find'), link: get('dht_link'),
      undelivered: get('dht_undelivered'), sync: get('dht_sync') } };
  get('dht_set_post')((events) => {
    const evs = Array.from(events);
    self.postMessage({ type: 'events', events: evs }, transferables(evs));
  });
  part = glue.make(ident.publicKey, ident.secretKey, pins || '{}',
    (json) => self.postMessage({ type: 'pins', json }), backend, role);
  const restored = journal ? Boolean(part.restore(journal)) : false;
  return { nodeId: ident.nodeId, restored,
    timings: { ...shared.timings, worker_python_ms: performance.now() - t0 } };
}

self.onmessage = async (ev) => {
  const m = ev.data;
  if (m.type === 'init') {
    try {
      self.postMessage({ type: 'ready', ...(await init(m)) });
    } catch (err) {
      self.postMessage({ type: 'error', message: String(err?.message || err) });
    }
    return;
  }
  if (m.type !== 'call') return;
  let events;
  try {
    events = Array.from(CALLS[m.fn](...m.args));
  } catch (err) {
    self.postMessage({ type: 'result', id: m.id, error: String(err?.message || err) });
    return;
  }
  self.postMessage({ type: 'result', id: m.id, events }, transferables(events));
};
