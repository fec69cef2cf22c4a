// The page's handle on participant_worker.js (Pyodide + shared/participant.py in a Web Worker).
// Calls are answered in the order they were made (the worker runs them one at a time), so the
// events of frames fed in order come back in order.
//
//   const p = new ParticipantClient({ onPins: (json) => save(json) });
//   const { nodeId, restored } = await p.init({ prefix, role, backend, pins, journal });
//   for (const e of await p.call('feed', [bytes], [bytes.buffer])) handle(e);

const WORKER_URL = '/static/worker/node/participant_worker.js';

export class ParticipantClient {
  constructor({ onPins = () => {}, onEvents = () => {} } = {}) {
    this.worker = new Worker(WORKER_URL, { type: 'module' });
    this.pending = new Map();
    this.nextId = 0;
    this.onPins = onPins;
    this.onEvents = onEvents;  // events the worker posts between calls (the DHT's, dht_glue.py)
    this.failed = null;
    this.worker.onmessage = (ev) => this.onMessage(ev.data);
    this.worker.onerror = (ev) => this.failAll(`the participant worker failed: ${ev.message || 'cannot load'}`);
  }

  onMessage(m) {
    if (m.type === 'pins') { this.onPins(m.json); return; }
    if (m.type === 'events') { this.onEvents(m.events); return; }
    if (m.type === 'ready' || m.type === 'error') {
      const init = this.initWaiter;
      this.initWaiter = null;
      if (m.type === 'ready') init?.resolve(m);
      else init?.reject(new Error(m.message));
      return;
    }
    if (m.type !== 'result') return;
    const p = this.pending.get(m.id);
    this.pending.delete(m.id);
    if (!p) return;
    if (m.error !== undefined) p.reject(new Error(m.error));
    else p.resolve(m.events);
  }

  failAll(message) {
    this.failed = message;
    this.initWaiter?.reject(new Error(message));
    this.initWaiter = null;
    for (const p of this.pending.values()) p.reject(new Error(message));
    this.pending.clear();
  }

  /** Load Pyodide and `shared` in the worker and make the participant; resolves with
   * {nodeId, restored (a journaled update was taken back), timings}. */
  init(options) {
    return new Promise((resolve, reject) => {
      this.initWaiter = { resolve, reject };
      this.worker.postMessage({ type: 'init', ...options });
    });
  }

  /** One call of the participant (participant_worker.js's CALLS) -> its events. */
  call(fn, args = [], transfer = []) {
    if (this.failed) return Promise.reject(new Error(this.failed));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ type: 'call', id, fn, args }, transfer);
    });
  }

  terminate() {
    this.worker.terminate();
    this.failAll('the participant worker was stopped');
  }
}
