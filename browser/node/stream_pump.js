// A tab's streamed update on the wire (docs/protocol.md, "Streamed updates"): the page's side
// of shared/stream_up.py's Sender, which runs in the participant's worker (node_glue.py).
//
// - The signed StreamSubmit goes over the `star` data channel when the run has one (the first
//   update waits for the channel, at most rtc_timeout_s, as a one-frame update does), else on
//   the WebSocket.
// - The server's Resume (it always comes on the WebSocket) becomes a "stream_chunks" event.
//   The pump pulls its Chunk frames from the worker one at a time (`streamNext`), each once the
//   path's buffer (WebSocket or RTCDataChannel `bufferedAmount`) holds less than one chunk:
//   about two chunk frames are queued at most, whatever the update's size. All chunks of one
//   Resume take the path chosen when it arrives (the server's window takes reordering within
//   16 chunks, not a switch of paths); a newer Resume stops the older one's chunks.
// - A data channel lost while the update is unacknowledged (closed, a send failed, or its
//   buffer stalled STALL_MS; native_node/stream_rtc.py's FrameLink stalls after 30 s too) stops
//   the chunks: the update is announced again on the WebSocket (`streamAgain`: fresh nonce,
//   same manifest), the server answers Resume at its first missing chunk, and only the rest
//   travels. A new channel is offered at once (at most MAX_REOFFERS a connection); later
//   transfers use it once it is open.
// - A closed WebSocket stops the chunks: after the reconnect the participant resubmits its
//   update and the server resumes it the same way.
//
// `stats` (the node's stats.stream): frames by path, resumes, lost channels, reoffers, the
// most chunk frames / bytes ever queued in the path's buffer right after a send, and the
// time of each upload (its StreamSubmit to its Ack; a lost channel's resume included).

import { wireBytes } from './rtc.js';

const POLL_MS = 4;  // how often a waiting pump looks at bufferedAmount (WebSockets have no event)
const STALL_MS = 30000;  // a channel whose buffer did not drain for this long is lost
export const MAX_REOFFERS = 3;  // new channels offered after losing one, per connection
const STREAM_SUBMIT = 17;
const MAX_UPLOADS = 16;

let clock = null;  // clock_worker.js, made at the first wait (null: page timers)
const waiting = new Map();
let nextWait = 0;

/** Resolves `ms` later, timed by clock_worker.js: a contributor's tab is often hidden, where
 * the page's own timers would pace the chunks at one a second, or one a minute. */
function sleep(ms) {
  if (clock === null && typeof Worker !== 'undefined') {
    try {
      clock = new Worker(new URL('./clock_worker.js', import.meta.url));
      clock.onmessage = (ev) => { const done = waiting.get(ev.data); waiting.delete(ev.data); done?.(); };
    } catch { clock = false; }
  }
  if (!clock) return new Promise((resolve) => { setTimeout(resolve, ms); });
  return new Promise((resolve) => {
    const id = nextWait++;
    waiting.set(id, resolve);
    clock.postMessage({ id, ms });
  });
}

/** Frames sent on a path, and how many of them its buffer still holds. */
class Queued {
  constructor(buffered) {
    this.buffered = buffered;  // () -> the path's bufferedAmount
    this.sent = 0;
    this.ends = [];  // cumulative end offsets of the frames not yet drained
  }

  add(bytes) { this.sent += bytes; this.ends.push(this.sent); }

  frames() {
    const drained = this.sent - this.buffered();
    while (this.ends.length && this.ends[0] <= drained) this.ends.shift();
    return this.ends.length;
  }
}

export class StreamPump {
  constructor(node) {
    this.node = node;  // the BrowserNode: ws, uplink, welcome, proto, send, startUplink, log
    this.pump = null;  // the Resume whose chunks are being sent (node_glue's pump id)
    this.flight = null;  // {round, digest, path, uplink, ws}: announced, no Ack yet
    this.welcome = null;  // the Welcome the reoffers are counted under
    this.reoffers = 0;
    this.stats = { submits_ws: 0, submits_rtc: 0, chunks_ws: 0, chunks_rtc: 0, resumes: 0,
      lost: 0, reoffers: 0, maxQueuedFrames: 0, maxQueuedBytes: 0, chunkBytes: 0,
      uploads: [] };  // the last MAX_UPLOADS updates: ms from the StreamSubmit to the Ack
    node.stats.stream = this.stats;
  }

  publish() { this.node.set({ stream: this.stats }); }

  /** A "send" event of our signed StreamSubmit (`round`, `digest` from node_glue.py). */
  async announce(e) {
    const node = this.node, up = node.uplink;
    this.pump = null;  // a new announcement: the older Resume's chunks stop
    const flight = { round: e.round, digest: e.digest, path: 'ws', uplink: null, ws: node.ws,
      size: e.size, t0: performance.now() };
    this.flight = flight;
    if (up) {
      if (await up.send(e.frame)) {
        Object.assign(flight, { path: 'rtc', uplink: up });
        this.watch(up);
        this.stats.submits_rtc += 1;
        this.publish();
        if (up.channel.readyState !== 'open') this.lost(up);  // closed as it went
        return;
      }
      this.reoffer(up);
    }
    if (node.ws && node.ws.readyState === WebSocket.OPEN) {
      node.ws.send(e.frame);
      flight.ws = node.ws;
      this.stats.submits_ws += 1;
      this.publish();
    }  // else the reconnect resubmits it
  }

  /** The server's Resume for our update: its chunks, one at a time. */
  async run(e) {
    const node = this.node, pump = e.pump, up = node.uplink, ws = node.ws;
    this.pump = pump;
    const rtc = Boolean(up && !up.fellBack && up.channel.readyState === 'open');
    const flight = this.flight;
    if (flight && flight.round === e.round && flight.digest === e.digest) {
      Object.assign(flight, { path: rtc ? 'rtc' : 'ws', uplink: rtc ? up : null, ws });
    }
    if (rtc) this.watch(up);
    if (!rtc && (!ws || ws.readyState !== WebSocket.OPEN)) return;  // the reconnect resumes
    if (e.next > 0) this.stats.resumes += 1;
    this.stats.chunkBytes = e.chunk_bytes;
    const buffered = rtc ? () => up.channel.bufferedAmount : () => ws.bufferedAmount;
    const usable = rtc ? () => up.channel.readyState === 'open' && !up.fellBack
      : () => ws.readyState === WebSocket.OPEN;
    const queued = new Queued(buffered);
    for (;;) {
      let low = buffered(), since = performance.now();
      while (this.pump === pump && usable() && buffered() >= e.chunk_bytes) {
        await sleep(POLL_MS);
        if (buffered() < low) { low = buffered(); since = performance.now(); }
        else if (rtc && performance.now() - since > STALL_MS) up.fellBack = true;  // -> lost
      }
      if (this.pump !== pump) return;
      if (!usable()) break;
      const events = await node.proto.call('streamNext', [pump]);
      if (this.pump !== pump || !events.length) break;
      const frame = events[0].frame;
      if (rtc) {
        if (!(await up.send(frame))) break;
        this.stats.chunks_rtc += 1;
      } else {
        if (ws.readyState !== WebSocket.OPEN) break;
        ws.send(frame);
        this.stats.chunks_ws += 1;
      }
      queued.add(rtc ? wireBytes(frame.length) : frame.length);
      this.stats.maxQueuedFrames = Math.max(this.stats.maxQueuedFrames, queued.frames());
      this.stats.maxQueuedBytes = Math.max(this.stats.maxQueuedBytes, buffered());
    }
    if (this.pump === pump) this.pump = null;
    if (rtc && !usable()) this.lost(up);
    this.publish();
  }

  /** An Ack for our update: it is in, nothing to resume. */
  onAck(e) {
    const f = this.flight;
    if (!f || f.round !== e.round || f.digest !== e.digest) return;
    this.flight = null;
    this.stats.uploads = [...this.stats.uploads, { round: f.round, bytes: f.size,
      ms: performance.now() - f.t0, status: e.status }].slice(-MAX_UPLOADS);
    this.publish();
  }

  /** Whether a frame is ours to send (a StreamSubmit); chunks only ever leave from run(). */
  takes(e) { return e.msg_type === STREAM_SUBMIT; }

  watch(up) {
    if (up.pumpWatched) return;
    up.pumpWatched = true;
    up.channel.addEventListener('close', () => this.lost(up));
  }

  /** `up`'s channel failed while our update went over it and is not acknowledged: the same
   * update again on the WebSocket (resumed by the server from its first missing chunk). */
  lost(up) {
    const node = this.node, f = this.flight;
    if (!f || f.path !== 'rtc' || f.uplink !== up) return;
    Object.assign(f, { path: 'ws', uplink: null });
    this.pump = null;
    const ws = node.ws;
    // the connection itself is gone (the server closes a node's channel with its socket):
    // the reconnect offers a new channel and resubmits the update, resumed as well
    if (!ws || ws !== f.ws || ws.readyState !== WebSocket.OPEN) return;
    this.stats.lost += 1;
    node.log('data channel to the server lost mid-transfer: the streamed update resumes over '
      + 'the WebSocket from the first chunk the server lacks');
    this.reoffer(up);
    node.proto.call('streamAgain', []).then((events) => {
      for (const ev of events) {
        if (this.flight !== f || ws.readyState !== WebSocket.OPEN) return;
        ws.send(ev.frame);
        this.stats.submits_ws += 1;
      }
      this.publish();
    }).catch((err) => node.log(`cannot announce the update again: ${err.message || err}`));
  }

  /** Offer a new channel when `up`'s had opened and is gone now. */
  reoffer(up) {
    const node = this.node, w = node.welcome;
    if (!w || w.transport !== 'star' || up !== node.uplink || !up.opened
        || (up.channel.readyState === 'open' && !up.fellBack)) return;
    if (w !== this.welcome) { this.welcome = w; this.reoffers = 0; }
    if (this.reoffers >= MAX_REOFFERS) return;
    this.reoffers += 1;
    this.stats.reoffers += 1;
    node.log(`offering a new data channel to the server (${this.reoffers} of at most ${MAX_REOFFERS})`);
    node.startUplink(w);
  }
}
