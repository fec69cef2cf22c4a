// The training tab's controller (main thread): Pyodide runs the participant's protocol logic
// (shared/participant.py, the same package native nodes use) in a Web Worker
// (participant_worker.js, reached through participant_client.js); this file moves its frames
// over the WebSocket (or the star uplink's data channel) and hands each round to the trainer in
// another Web Worker (train_worker.js). Nothing heavy runs on the page's main thread.
//
//   const node = new BrowserNode();
//   node.addEventListener('change', () => render(node.stats));
//   await node.start();          // load, connect, train every round until the run ends
//   node.pause(); node.resume(); await node.useOwnText(file); await node.generate('ab', 40);

import { ParticipantClient } from './participant_client.js';
import { decodeUpdate } from './codecs.js';
import { StarUplink } from './rtc.js';
import { StreamPump } from './stream_pump.js';
import { TabMesh } from './mesh.js';
import { TabDhtLink } from './dht.js';
import { generateText, softmax, textWindows, bigramReference, fitCheck, describeData } from './local_model.js';
import { fetchArrays } from './data.js';

const JOURNAL_KEY = 'daa-prime/pending-update';
const PINS_KEY = 'daa-prime/server-pins';
const BACKOFF_MAX_MS = 10000;
const GRAPHS_RETRY_MS = 2000;  // the server's graphs are not exported yet: ask again
const GROUP_WAIT_MS = 5000;  // grouped p2p: a RoundOpen waits this long for the group's aggregate
// A tab's train step holds params, both AdamW moments, their three outputs and the gradient
// (7 float32 copies) in one wasm32 heap of at most 4 GiB: keep that under 2 GiB.
export const TAB_STATE_BYTES = 2 ** 31;

/** Why this tab cannot train the run's model ({reason, detail}), or null (docs/byo_model.md). */
export function trainUnavailable(manifest) {
  if (manifest.train_unavailable) return manifest.train_unavailable;
  const need = 7 * 4 * manifest.n_params;
  if (need > TAB_STATE_BYTES) {
    return { reason: 'too_large', detail: `${manifest.n_params.toLocaleString()} parameters need ` +
      `${(need / 2 ** 30).toFixed(1)} GiB of training state; a tab holds at most ${TAB_STATE_BYTES / 2 ** 30} GiB` };
  }
  return null;
}

/** 'webgpu' when navigator.gpu gives an adapter (or when forced), else 'wasm'. */
export async function pickBackend(requested = 'auto') {
  const notes = [];
  let backend = requested;
  if (requested === 'auto' || requested === 'webgpu') {
    let adapter = null;
    try { adapter = navigator.gpu ? await navigator.gpu.requestAdapter() : null; } catch { adapter = null; }
    if (adapter) backend = 'webgpu';
    else {
      backend = 'wasm';
      notes.push('No WebGPU adapter in this browser: using WebAssembly.');
    }
  }
  if (!self.crossOriginIsolated) notes.push('No SharedArrayBuffer (page not cross-origin isolated): single thread.');
  return { backend, notes };
}

function storageGet(key) { try { return localStorage.getItem(key); } catch { return null; } }
function storageSet(key, value) {
  try { if (value === null) localStorage.removeItem(key); else localStorage.setItem(key, value); } catch { /* private mode */ }
}

export class BrowserNode extends EventTarget {
  constructor({ backend = 'auto', storagePrefix = '', role = 'trainer' } = {}) {
    super();
    this.role = role;
    this.requestedBackend = backend;
    this.prefix = storagePrefix;
    this.proto = null;  // ParticipantClient: the participant in its worker
    this.worker = null;
    this.ws = null;
    this.stopped = false;
    this.welcome = null;
    this.workerModel = null;  // model id the worker's sessions were built for
    this.params = null;       // latest global params (Float32Array), for "try the model"
    this.dataSource = 'server';
    this.pendingInfer = new Map();
    this.dht = new TabDhtLink(this);  // peer discovery when the run has it (dht.js)
    this.stats = {
      state: 'loading', backend: null, threads: null, notes: [], nodeId: null, runId: null,
      model: null, task: null, round: null, version: null, contributed: 0, accepted: 0, rejected: 0,
      rejections: [], evalLoss: [], entropyFloor: null, stepLoss: null, stepsDone: 0, stepsTotal: 0, totalSteps: 0,
      samplesPerS: null, paused: false, rows: null, dataSource: 'server', errors: [], timings: {},
      firstAcceptedMs: null, consoleErrors: 0, role, judged: 0, lastVerdict: null, transport: null,
      learns: null, ownDataCheck: null, ownDataNote: null, stoppedAt: null, resubmitted: 0,
      updatesVia: {},  // how each update left: {webrtc: n, relay: m}
    };
    this.pump = new StreamPump(this);  // streamed updates: stats.stream (stream_pump.js)
    this.t0 = performance.now();
  }

  set(patch) {
    Object.assign(this.stats, patch);
    this.dispatchEvent(new Event('change'));
  }

  log(msg, level = 'info') {
    (level === 'error' ? console.error : console.log)(`[daa-node] ${msg}`);
    if (level === 'error') this.set({ errors: [...this.stats.errors, msg].slice(-5) });
  }

  // -- start-up ---------------------------------------------------------------------------
  async start() {
    const { backend, notes } = await pickBackend(this.requestedBackend);
    this.set({ backend, notes, state: 'loading Python and the model' });
    // The graphs load in the worker while Pyodide loads here; the tab connects (and so counts
    // toward a round) only once it can train: an unready tab never holds a round.
    this.modelReady = this.prepareModel();
    const pinsKey = `${this.prefix}${PINS_KEY}`;
    this.proto = new ParticipantClient({ onPins: (json) => storageSet(pinsKey, json),
      onEvents: (events) => { for (const e of events) this.onEvent(e); } });  // the DHT's
    const info = await this.proto.init({ prefix: this.prefix, role: this.role, backend,
      pins: storageGet(pinsKey) || '{}', journal: storageGet(`${this.prefix}${JOURNAL_KEY}`) });
    if (info.restored) this.log('an update trained before the reload is kept for resubmission');
    this.set({ nodeId: info.nodeId, timings: { ...this.stats.timings, ...info.timings,
      python_ms: performance.now() - this.t0 } });
    await this.modelReady;
    if (this.stats.cannotTrain) return;  // inference only (or nothing): never joins a round
    this.set({ state: 'connecting', timings: { ...this.stats.timings, ready_ms: performance.now() - this.t0 } });
    this.connect(0);
  }

  /** This tab cannot train the run's model: say why; `infer`: the inference graph loaded. */
  cannotTrain(why, infer) {
    this.stopped = true;
    const state = infer ? `inference only (${why.reason})` : `cannot run this model (${why.reason})`;
    this.set({ cannotTrain: { ...why, infer }, state,
      notes: [...this.stats.notes, `This tab cannot train the run's model: ${why.reason}: ${why.detail}`] });
  }

  /** A finished run: no training, only the final model ("try the model", download). */
  async startFinished() {
    const { backend, notes } = await pickBackend(this.requestedBackend);
    this.set({ backend, notes, state: 'loading the final model' });
    this.modelReady = this.prepareModel();
    await this.modelReady;
    const cfg = this.manifest.model_config;
    this.set({ task: cfg.task === 'classify' ? 'classify' : 'lm',
      model: `${cfg.name} (${this.manifest.n_params.toLocaleString()} params)` });
    this.finish();
  }

  /** The run's graphs in a fresh worker (no data yet). Retries while the server has not
   * exported them; resolves once the worker can train. */
  async prepareModel() {
    const t0 = performance.now();
    for (;;) {
      const resp = await fetch('/model/onnx/manifest.json').catch(() => null);
      if (resp && resp.ok) { this.manifest = await resp.json(); break; }
      if (resp && resp.status === 422) { this.cannotTrain(await resp.json(), false); return; }
      this.set({ state: 'waiting for the server to export the model' });
      await new Promise((r) => setTimeout(r, GRAPHS_RETRY_MS));
    }
    this.worker?.terminate();
    this.worker = new Worker(new URL('./train_worker.js', import.meta.url), { type: 'module' });
    const ready = new Promise((resolve, reject) => {
      this.worker.onmessage = (ev) => {
        if (ev.data.type === 'ready') resolve(ev.data);
        else if (ev.data.type === 'error') reject(new Error(ev.data.message));
      };
    });
    const why = trainUnavailable(this.manifest);
    this.worker.postMessage({ type: 'init', backend: this.stats.backend,
      graphs: { train: why ? null : '/model/onnx/train_step.onnx', infer: '/model/onnx/infer.onnx' } });
    const info = await ready;
    if (why) this.cannotTrain(why, true);
    this.worker.onmessage = (ev) => this.onWorker(ev.data);
    this.workerGraphs = this.manifest.model_id;
    this.set({ threads: info.threads, timings: { ...this.stats.timings, graphs_ms: performance.now() - t0 } });
  }

  // -- the control socket -----------------------------------------------------------------
  connect(attempt) {
    if (this.stopped || this.away) return;
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(`${proto}//${location.host}/ws`);
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    this.set({ state: 'connecting' });
    ws.onopen = () => { this.participant('connected').catch((err) => this.log(`${err}`, 'error')); attempt = 0; };
    ws.onmessage = (ev) => { if (ev.data instanceof ArrayBuffer) this.feed(ev.data); };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.stopped || this.away) return;
      const delay = Math.min(BACKOFF_MAX_MS, 250 * 2 ** attempt) * (0.8 + 0.4 * Math.random());
      this.set({ state: `reconnecting in ${(delay / 1000).toFixed(1)} s` });
      setTimeout(() => this.connect(attempt + 1), delay);
    };
  }

  /** One call of the participant in its worker; its events are carried out here, in the
   * order the calls were made. Resolves with the events. */
  async participant(fn, args = [], transfer = []) {
    const events = await this.proto.call(fn, args, transfer);
    for (const e of events) this.onEvent(e);
    return events;
  }

  /** A frame from the server to the participant. In a grouped p2p run a RoundOpen (frame
   * type 3, byte 5) can overtake the combined aggregate that the group's aggregators forward
   * by another path: it waits for the tab's p2p_round, at most GROUP_WAIT_MS (as
   * native_node/group.py's before_frame), else the outer step would miss it and resync.
   * Plain p2p runs do not hold it (yet): a RoundOpen that overtakes a primary's relayed
   * shard makes the tab resync (tried: holding it there too broke a secagg p2p e2e run). */
  feed(buf) {
    const frame = new Uint8Array(buf);
    if (this.groupWait != null && frame.length >= 16 && frame[5] === 3) {
      (this.groupHeld ||= []).push(buf);
      this.groupTimer ||= setTimeout(() => this.releaseGroup(), GROUP_WAIT_MS);
      return;
    }
    this.participant('feed', [frame], [buf])
      .catch((err) => this.log(`protocol logic failed: ${err.message || err}`, 'error'));
  }

  releaseGroup() {
    clearTimeout(this.groupTimer);
    this.groupWait = this.groupTimer = null;
    const held = this.groupHeld || [];
    this.groupHeld = [];
    for (const buf of held) this.feed(buf);
  }

  send(frame) {
    if (!(frame instanceof Uint8Array)) throw new TypeError('frames are bytes');
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(frame);
  }

  /** An update over the star data channel, or on the socket when it is not (or no longer)
   * usable: the relay fallback. */
  async sendUpdate(frame) {
    const direct = await this.uplink.send(frame);
    const via = direct ? 'webrtc' : 'relay', counts = this.stats.updatesVia;
    this.set({ transport: this.uplink.state, updatesVia: { ...counts, [via]: (counts[via] || 0) + 1 } });
    if (!direct) this.send(frame);
  }

  startUplink(w) {
    this.uplink?.close();
    this.uplink = null;
    if (w.transport !== 'star' || this.role !== 'trainer' || typeof RTCPeerConnection === 'undefined') {
      this.set({ transport: 'websocket' });
      return;
    }
    const up = new StarUplink((kind, data) => {
      this.participant('signal', [kind, data]).catch((err) => this.log(`WebRTC signal: ${err.message || err}`));
    }, { timeoutS: w.rtc_timeout_s, iceServers: w.ice_servers ?? [] });
    this.uplink = up;
    up.channel.addEventListener('open', () => this.set({ transport: up.state }));
    up.channel.addEventListener('close', () => this.set({ transport: 'relay' }));
    this.set({ transport: 'connecting' });
    up.start().catch((err) => this.log(`WebRTC offer failed: ${err.message || err}; relaying`));
  }

  /** transport p2p: direct channels to the plan's members (mesh.js), shards on them. */
  startMesh(w) {
    if (w.transport !== 'p2p' || this.role !== 'trainer' || typeof RTCPeerConnection === 'undefined') return;
    if (this.mesh && this.mesh.me === w.node_id && this.meshRun === w.run_id) {
      this.mesh.iceServers = w.ice_servers ?? [];  // fresh TURN credentials for new links
      return;
    }
    this.mesh?.close();
    this.meshRun = w.run_id;
    this.mesh = new TabMesh(w.node_id,
      (to, kind, data) => this.participant('signal', [kind, data, to]).catch((err) => this.log(`p2p signal: ${err.message || err}`)),
      (peer, frame) => this.dht.onDirect(peer, frame)
        || this.participant('link', [peer, frame], [frame.buffer]).catch((err) => this.log(`p2p frame: ${err.message || err}`)),
      { timeoutS: w.rtc_timeout_s, iceServers: w.ice_servers ?? [] });
    this.set({ transport: 'p2p', p2p: { rounds: 0, direct: 0, relayed: 0 } });
    const cap = new URLSearchParams(location.search).get('p2p_cap');  // fewer direct channels
    if (cap !== null) this.participant('cap', [Number(cap)]).catch((err) => this.log(`p2p cap: ${err.message || err}`));
  }

  /** A signed Shard for a member: its data channel, else the socket (the server forwards
   * it). With `p2pHold` set (tests: a tab stuck mid-reduction) shards wait. */
  sendShard(to, frame) {
    if (this.p2pHold) { (this.held ||= []).push([to, frame]); return; }
    this.mesh.send(to, frame).then((direct) => { if (!direct) this.send(frame); })
      .catch(() => this.send(frame));
  }

  onP2PRound(e) {
    if (this.groupWait === e.round) this.releaseGroup();
    const m = this.mesh?.stats ?? {};
    this.set({ p2p: { ...e, rounds: (this.stats.p2p?.rounds ?? 0) + 1, direct: m.direct, relayed: m.relayed,
      links: this.mesh?.open ?? 0, failed: m.failed, pairs: m.pairs, maxBuffered: m.maxBuffered },
    state: e.secagg ? `summed its masked shards of round ${e.round}` : `holding the aggregate of round ${e.round}` });
  }

  onEvent(e) {
    switch (e.kind) {
      case 'send':
        if (e.msg_type === 14 && this.p2pHold) { (this.held ||= []).push([null, e.frame]); break; }
        if (e.msg_type === 4 && this.uplink) this.sendUpdate(e.frame);  // Submit: star channel
        else if (this.pump.takes(e)) this.pump.announce(e).catch((err) => this.log(`streamed update: ${err.message || err}`));
        else this.send(e.frame);
        break;
      case 'signal':
        if (e.signal === 'answer' && e.from === 'server' && this.uplink) {
          this.uplink.onAnswer(e.data).catch((err) => this.log(`WebRTC answer: ${err.message || err}`));
        } else if (e.from !== 'server' && this.mesh) {  // p2p: a member's offer or answer
          this.mesh.onSignal(e.from, e.signal, e.data).catch((err) => this.log(`p2p signal: ${err.message || err}`));
        }
        break;
      case 'mesh':
        this.mesh?.link(e.peers, e.ice_servers); this.set({ state: `reducing round ${e.round}` });
        if (e.group != null) this.groupWait = e.round;  // grouped: hold the next RoundOpen
        break;
      case 'shard_out': this.sendShard(e.to, e.frame); break;
      case 'stream_chunks': this.pump.run(e).catch((err) => this.log(`streamed update: ${err.message || err}`)); break;
      case 'p2p_round': this.onP2PRound(e); break;
      case 'welcome': this.onWelcome(e).catch((err) => this.fail(`cannot join: ${err.message || err}`)); break;
      case 'train':  // e.downlink: the RoundOpen kinds taken and resyncs (shared/open_kinds.py)
        if (e.downlink) this.set({ downlink: e.downlink, aheadMerges: e.ahead_merges });
        this.onTrain(e);
        break;
      case 'round': this.set({ round: e.round, version: e.params_digest.slice(0, 12), state: `holding round ${e.round}` }); break;
      case 'validate': this.onValidate(e).catch((err) => this.log(`round ${e.round}: cannot score: ${err.message || err}`, 'error')); break;
      case 'resubmit':
        this.params = new Float32Array(e.params.slice().buffer);
        this.set({ round: e.round, version: e.params_digest.slice(0, 12), state: `resubmitted round ${e.round}`,
          resubmitted: this.stats.resubmitted + 1 });
        break;
      case 'cancel': this.worker?.postMessage({ type: 'cancel', round: e.round }); break;
      case 'train_ahead': this.onTrainAhead(e); break;  // run option overlap
      case 'ack':
        this.pump.onAck(e);
        if (e.status === 'accepted' && this.stats.firstAcceptedMs === null) {
          this.stats.firstAcceptedMs = performance.now() - this.t0;
        }
        this.set({ accepted: this.stats.accepted + (e.status === 'accepted' ? 1 : 0) });
        break;
      case 'committed': this.onCommitted(e); break;
      case 'secagg': this.onSecAgg(e); break;
      case 'error':
        this.log(`server: ${e.code}: ${e.message}`);
        if (e.round !== null && e.round !== undefined) {
          this.set({ rejected: this.stats.rejected + 1,
            rejections: [...this.stats.rejections, { round: e.round, code: e.code, message: e.message }].slice(-20) });
        }
        break;
      case 'journal': storageSet(`${this.prefix}${JOURNAL_KEY}`, e.entry ?? null); break;
      case 'refused': this.log(`dropped a frame from the server: ${e.message}`); break;
      case 'reconnect':
        if (e.downlink) this.set({ downlink: e.downlink });
        this.log(e.message); this.ws?.close(); break;
      case 'fatal': this.fail(e.message); break;
      default: if (e.kind.startsWith('dht_')) this.dht.onEvent(e); break;
    }
  }

  /** Secure aggregation (shared/secagg/round.py): the fixed-point update this tab masked stays
   * here (`secaggPlain`, for the page's own checks); only its masked form left the tab. */
  onSecAgg(e) {
    if (e.stage === 'masked') this.secaggPlain = { round: e.round, ring: e.plain };
    this.set({ secagg: { round: e.round, stage: e.stage },
      state: e.stage === 'waiting' ? `round ${e.round}: trained; waiting for the secure-aggregation keys`
        : `round ${e.round}: masked update sent` });
  }

  fail(message) {
    this.stopped = true;
    this.log(message, 'error');
    this.set({ state: 'stopped' });
    this.ws?.close();
  }

  async onWelcome(w) {
    this.welcome = w;
    const resubmitted = this.stats.resubmitted;  // a RoundOpen may resubmit while data loads
    this.startUplink(w);
    this.startMesh(w);
    this.dht.onWelcome(w).catch((err) => this.log(`dht: ${err.message || err}`));
    const model = w.model;
    this.set({ runId: w.run_id, model: `${model.name} (${w.n_params.toLocaleString()} params)`,
      task: w.data.kind === 'digits' ? 'classify' : 'lm' });
    if (this.workerModel === w.model_id) return;
    if (this.workerGraphs !== w.model_id) {  // the server moved to another model: reload
      this.ws?.close();
      this.modelReady = this.prepareModel();
      await this.modelReady;
      return;  // the socket reconnects
    }
    // the graphs' layout must hash, with the run's model config, to the run's model id
    await this.proto.call('setLayout', [JSON.stringify(this.manifest.layout)]);
    if (this.stats.resubmitted === resubmitted) this.set({ state: 'fetching data' });
    const t0 = performance.now();
    const validator = this.role === 'validator';
    const data = validator ? null : await this.fetchShard(w.shard, w.n_shards);
    const val = validator ? await this.fetchData('/data/val?samples=512') : null;
    const payload = data || val;
    if (!validator) this.reference = bigramReference(data, this.vocab);
    this.set({ learns: describeData(w.data, payload, this.vocab) });
    const seed = parseInt(w.node_id.slice(0, 8), 16);
    this.worker.postMessage({ type: validator ? 'val' : 'data', source: 'server', seed, data: payload },
      [payload.x, payload.y]);
    this.workerModel = w.model_id;
    if (this.ownText) await this.useOwnText(this.ownText).catch((err) => this.set({ ownDataNote: `your file: ${err.message || err}` }));
    this.set({ rows: payload.meta.rows,
      dataSource: validator ? 'validation rows from the server' : this.stats.dataSource,
      timings: { ...this.stats.timings, model_ms: performance.now() - t0 } });
    if (this.queued) { const q = this.queued; this.queued = null; this.onTrain(q); }
    // a journal entry resubmitted while the data loaded keeps its state line
    else if (this.stats.resubmitted === resubmitted) this.set({ state: validator ? 'waiting for candidates' : 'waiting for a round' });
  }

  async fetchData(url) {
    const data = await fetchArrays(url);
    this.vocab = data.meta.vocab || null;
    this.context = this.welcome?.model.context ?? this.manifest?.model_config.context ?? null;
    this.set({ entropyFloor: data.meta.entropy_floor ?? null });
    return data;
  }

  fetchShard(shard, nShards) { return this.fetchData(`/data/shard?shard=${shard}&n_shards=${nShards}`); }

  /** Validator: held-out loss of theta_r and of theta_r - Delta_i for every candidate. */
  async onValidate(e) {
    await this.modelReady;  // the worker's graphs are loaded before the tab connects
    const theta = new Float32Array(e.params.slice().buffer);
    this.params = theta;
    this.set({ state: `scoring ${e.candidates.length} candidates of round ${e.round}` });
    const bufs = [theta.slice().buffer];
    const ok = [];
    for (const c of e.candidates) {
      let delta = null;
      try {
        delta = decodeUpdate(c.payload, e.length, { expect: e.codec });
      } catch (err) {
        this.log(`round ${e.round}: candidate ${c.node_id.slice(0, 12)} does not decode: ${err.message}`);
      }
      ok.push(delta !== null);
      if (delta !== null) {
        const cand = new Float32Array(theta.length);
        for (let i = 0; i < theta.length; i++) cand[i] = theta[i] - delta[i];
        bufs.push(cand.buffer);
      }
    }
    const id = Math.random().toString(36).slice(2);
    const losses = await new Promise((resolve) => {
      this.pendingInfer.set(id, resolve);
      this.worker.postMessage({ type: 'score', id, candidates: bufs }, bufs);
    });
    const [base, ...rest] = losses;
    const it = rest[Symbol.iterator]();
    const all = ok.map((good) => (good ? it.next().value : NaN));
    await this.participant('verdict', [e.round, base, all.map((v) => (Number.isFinite(v) ? v : NaN))]);
    const lastVerdict = { round: e.round, base, losses: all.map((v) => (Number.isFinite(v) ? v : null)) };
    this.firstVerdict = this.firstVerdict || lastVerdict;
    this.set({ judged: this.stats.judged + all.length, state: `judged round ${e.round}`, lastVerdict });
  }

  onTrain(e) {
    this.params = new Float32Array(e.params.buffer.slice(e.params.byteOffset, e.params.byteOffset + e.params.byteLength));
    this.set({ round: e.round, version: e.params_digest.slice(0, 12) });
    if (this.workerModel !== this.welcome?.model_id) { this.queued = e; return; }
    if (this.stats.paused) { this.trainingStopped(e.round); return; }
    const params = this.params.slice();
    this.trainStart = performance.now();
    this.firstTrain ??= this.trainStart;  // stats.computeS / stats.trainWallS: utilization
    this.lastTrain = { steps: e.steps, lr: e.lr, batchSize: e.batch_size };  // for steps ahead
    this.trainingRound = e.round;
    this.set({ state: `training round ${e.round}`, stepsDone: 0, stepsTotal: e.steps });
    // time_budget_s (autotune): as many steps as fit in it, at most e.steps (docs/autotune.md)
    this.worker.postMessage({ type: 'round', round: e.round, params: params.buffer, steps: e.steps,
      lr: e.lr, batchSize: e.batch_size, budgetS: e.time_budget_s ?? null, merge: Boolean(e.merge) },
    [params.buffer]);
  }

  /** Overlap (shared/overlap.py): right after its Submit the tab trains the next round's steps
   * in the train worker (ahead.js); that round's RoundOpen (merge) takes them over. */
  onTrainAhead(e) {
    if (!this.lastTrain || this.stats.paused || this.workerModel !== this.welcome?.model_id) return;
    this.set({ state: `training ahead of round ${e.after_round + 1}` });
    this.worker.postMessage({ type: 'ahead', afterRound: e.after_round, ...this.lastTrain });
  }

  onWorker(m) {
    if (m.type === 'step') {
      this.set({ stepsDone: m.step, stepLoss: m.loss, totalSteps: this.stats.totalSteps + 1,
        stepsAhead: (this.stats.stepsAhead ?? 0) + (m.ahead ? 1 : 0) });
    } else if (m.type === 'done') {
      this.trainingRound = null;
      this.set({ computeS: (this.stats.computeS ?? 0) + m.computeS,
        trainWallS: (performance.now() - this.firstTrain) / 1000 });
      if (this.stats.paused) {  // finished just as Pause was pressed: the round is given up
        this.trainingStopped(m.round);
        return;
      }
      this.submit(m, (performance.now() - this.trainStart) / 1000);
    } else if (m.type === 'cancelled') {
      this.trainingRound = null;
      this.trainingStopped(m.round);
      const why = this.stats.paused ? 'paused: nothing is sent for this round' : 'the round moved on';
      this.log(`round ${m.round}: training stopped after ${m.steps} steps (${why})`);
      this.set({ stoppedAt: { round: m.round, steps: m.steps, paused: this.stats.paused } });
    } else if (m.type === 'score') {
      const resolve = this.pendingInfer.get(m.id);
      this.pendingInfer.delete(m.id);
      resolve?.(m.losses);
    } else if (m.type === 'infer') {
      const resolve = this.pendingInfer.get(m.id);
      this.pendingInfer.delete(m.id);
      resolve?.({ logits: new Float32Array(m.logits), dims: m.dims });
    } else if (m.type === 'error') {
      this.log(`trainer: ${m.message}`, 'error');
    }
  }

  /** The worker's pseudo-gradient -> the participant (encode, journal, sign) -> Submit. */
  async submit(m, wall) {
    let events;
    try {
      events = await this.participant('submit', [m.round, new Uint8Array(m.delta), m.trainLoss,
        m.samples, m.computeS], [m.delta]);
    } catch (err) {
      this.log(`round ${m.round}: cannot submit: ${err.message || err}`, 'error');
      return;
    }
    const sent = events.some((e) => e.kind === 'send');
    this.set({ contributed: this.stats.contributed + (sent ? 1 : 0), samplesPerS: m.samples / wall,
      state: sent ? `submitted round ${m.round}` : this.stats.state });
  }

  /** The trainer stopped `round` without a result: the participant trains it again if offered. */
  trainingStopped(round) {
    this.participant('stopped', [round]).catch((err) => this.log(`${err.message || err}`, 'error'));
  }

  onCommitted(e) {
    const evalLoss = e.eval_loss === null || e.eval_loss === undefined ? this.stats.evalLoss
      : [...this.stats.evalLoss, [e.round, e.eval_loss]];
    this.set({ evalLoss });
    if (e.final) this.finish();
  }

  // -- controls ---------------------------------------------------------------------------
  /** Stop between two inner steps and give up the round: nothing is sent for it. The tab
   * leaves (closes its socket), so the server does not wait for it; Resume rejoins at the
   * next round. */
  pause() {
    if (this.stats.paused || this.stopped) return;
    const round = this.trainingRound ?? this.stats.round;
    this.givenUp = round;
    this.set({ paused: true, state: 'paused' });
    if (this.trainingRound !== null && this.trainingRound !== undefined) {
      this.worker?.postMessage({ type: 'cancel', round: this.trainingRound });
    }
    this.away = true;
    this.ws?.close();
  }

  /** Rejoin once the server has moved past the round given up at Pause, or at once when no
   * other trainer is connected (nobody else would move the run on; the round then starts
   * afresh here: nothing trained before the pause is sent). */
  async resume() {
    if (!this.stats.paused || this.stopped) return;
    this.set({ paused: false, state: 'rejoining at the next round' });
    const token = {};
    this.resuming = token;
    for (;;) {
      const run = await fetch('/api/run', { cache: 'no-store' }).then((r) => r.json()).catch(() => null);
      if (this.resuming !== token || this.stats.paused) return;
      if (run && run.status === 'finished') { this.finish(); return; }
      if (run && (this.givenUp === null || this.givenUp === undefined || run.round > this.givenUp
        || !run.peers_connected)) break;
      await new Promise((r) => setTimeout(r, 500));
    }
    this.away = false;
    this.connect(0);
  }

  /** Look a node up in the DHT: {found, hops, queries, ms} (dht.js). */
  dhtFind(nodeId) { return this.dht.find(nodeId); }

  /** The run committed its last round: no more training; the final model stays usable. */
  finish() {
    this.stopped = true;
    this.finished = true;
    this.params = null;  // "try the model" loads the final params
    this.worker?.postMessage({ type: 'ahead_stop' });  // overlap: no round follows the last
    this.set({ state: 'the run is finished', paused: false, stepsDone: 0, stepsTotal: 0 });
    this.ws?.close();
  }

  stop() {
    this.stopped = true;
    this.worker?.terminate();
    this.proto?.terminate();
    this.uplink?.close();
    this.mesh?.close();
    this.dht.close();
    this.ws?.close();
    this.set({ state: 'stopped' });
  }

  /** Train on a local text file from now on, if it fits what the run learns: a file whose
   * characters or statistics do not is refused with the reason. It never leaves the tab. */
  async useOwnText(file) {
    if (this.stats.task === 'classify') throw new Error('this run trains a digit classifier: own text cannot be used');
    if (!this.vocab || !this.reference) {
      this.ownText = file;
      return { rows: 0, pending: true };
    }
    this.set({ ownDataNote: null });
    const text = typeof file === 'string' ? file : await file.text();
    const check = fitCheck(text, this.vocab, this.reference);
    this.set({ ownDataCheck: check });
    if (!check.ok) {
      this.ownText = null;
      const err = new Error(`not used: ${check.reason}`);
      err.check = check;
      throw err;
    }
    this.ownText = file;
    const { meta, x, y, skipped } = textWindows(text, this.vocab, this.context);
    this.worker.postMessage({ type: 'data', source: 'own', data: { meta, x: x.buffer, y: y.buffer } }, [x.buffer, y.buffer]);
    this.set({ dataSource: `your file (${meta.rows} windows, ${skipped} unknown characters skipped)`, rows: meta.rows });
    return { rows: meta.rows, skipped, check };
  }

  async infer(x, dims, xType) {
    if (!this.worker || !this.workerGraphs) throw new Error('the model is still loading: try again in a few seconds');
    if (!this.params) {  // a finished run, or no round seen yet: the latest committed params
      const resp = await fetch('/model/params.bin', { cache: 'no-store' });
      if (!resp.ok) throw new Error(`cannot load the model: HTTP ${resp.status}`);
      this.params = new Float32Array(await resp.arrayBuffer());
    }
    const id = Math.random().toString(36).slice(2);
    const params = this.params.slice();
    return new Promise((resolve) => {
      this.pendingInfer.set(id, resolve);
      this.worker.postMessage({ type: 'infer', id, params: params.buffer, x, dims, xType }, [params.buffer]);
    });
  }

  /** Continue `prompt` by `n` symbols with the latest global model (sampled, temperature). */
  async generate(prompt, n = 60, temperature = 0.8) {
    if (this.stats.task === 'classify') throw new Error('this run trains a digit classifier: draw a digit instead');
    if (!this.vocab) await this.loadVocab();
    return generateText((ids) => this.infer(ids, [1, ids.length], 'int64'), this.vocab, this.context,
      prompt, n, temperature);
  }

  /** The vocabulary without a shard (a finished run, or before the first Welcome). */
  async loadVocab() {
    if (!this.manifest) throw new Error('the model is still loading: try again in a few seconds');
    const data = await fetchArrays('/data/val?samples=1');
    this.vocab = data.meta.vocab || null;
    this.context = this.manifest.model_config.context || null;
    if (!this.vocab) throw new Error('this run trains a digit classifier: draw a digit instead');
  }

  /** Class probabilities for one input row (mlp-digits: 64 pixel values in [0, 1]). */
  async classify(pixels) {
    return softmax((await this.infer(pixels, [1, pixels.length], 'float32')).logits);
  }
}
