// The tab's trainer, in a Web Worker so the page stays responsive: ONNX Runtime Web runs the
// run's exported train-step graph (forward + backward + clip + AdamW, ml/onnx_export.py)
// H times per round on this tab's shard, and the inference graph for "try the model".
//
// Messages in (postMessage):                      Messages out:
//   {type:'init', backend, graphs}               {type:'ready', backend, threads, loadMs}
//   {type:'data', data, seed} / {type:'val', data} {type:'data', rows, source}
//   {type:'round', round, params, steps, lr,     {type:'step', round, step, loss, ms}
//    batchSize}                                  {type:'done', round, delta, trainLoss,
//   {type:'pause'} / {type:'resume'}              samples, computeS, steps}
//   {type:'cancel', round}                       {type:'cancelled', round, steps}
//   {type:'infer', id, params, x, dims}          {type:'infer', id, logits, dims}
//   {type:'bench', params, steps, batchSize}     {type:'bench', stepMs, loss, params}
//   {type:'ahead', afterRound, steps, lr,        (steps ahead post 'step' with ahead: true)
//    batchSize} / {type:'ahead_stop'}            overlap (ahead.js): the next round's steps
//   ('round' with merge: true takes them over)   from where the last round's ended
//   {type:'score', id, candidates: [params]}     {type:'score', id, losses} (validators)
//                                                {type:'error', message}
// `data` = {x: ArrayBuffer, y: ArrayBuffer, meta} (the layout server/browser_data.py serves).
// AdamW moments and the step counter persist across rounds, as in the native trainer.

import { AheadRun } from './ahead.js';

const VENDOR = '/static/vendor/onnxruntime-web/';
let ort = null;
let train = null;  // InferenceSession of train_step.onnx
let infer = null;  // ... of infer.onnx
let info = null;   // {backend, threads}
let shard = null;  // {x, y, rows, xCols, yCols, lm}
let val = null;    // the same, for the validation rows a validator scores on
let moments = null;  // {m, v, step}
let local = null;  // where the last round's steps ended (overlap: steps ahead start there)
let ahead = null;  // AheadRun: steps run ahead of the next round (ahead.js)
let paused = false;
let resumeWaiters = [];
const cancelled = new Set();
let rng = 0x9e3779b9;
let queue = [];

function post(msg, transfer = []) { self.postMessage(msg, transfer); }

async function loadOrt(backend) {
  // ort.min.mjs carries the WebGPU execution provider (and wasm); ort.wasm.min.mjs only wasm.
  ort = await import(`${VENDOR}${backend === 'webgpu' ? 'ort.min.mjs' : 'ort.wasm.min.mjs'}`);
  ort.env.wasm.wasmPaths = VENDOR;
  const threads = self.crossOriginIsolated ? Math.max(1, Math.min(4, navigator.hardwareConcurrency || 1)) : 1;
  ort.env.wasm.numThreads = threads;
  ort.env.logLevel = 'error';
  return threads;
}

async function session(url, backend) {
  const resp = await fetch(url);
  if (!resp.ok) throw new Error(`GET ${url}: HTTP ${resp.status} ${await resp.text()}`);
  const bytes = new Uint8Array(await resp.arrayBuffer());
  return ort.InferenceSession.create(bytes, {
    executionProviders: backend === 'webgpu' ? ['webgpu'] : ['wasm'],
    graphOptimizationLevel: 'all',
    logSeverityLevel: 3,  // errors only: ORT's warnings would land on the console as errors
  });
}

function arrays(data) {
  const { meta } = data;
  const lm = meta.task === 'lm';
  const x = lm ? new Int32Array(data.x) : new Float32Array(data.x);
  const out = { x, y: new Int32Array(data.y), rows: meta.rows, xCols: meta.x_cols, yCols: meta.y_cols, lm };
  if (!(out.rows > 0) || x.length !== out.rows * out.xCols || out.y.length !== out.rows * out.yCols) {
    throw new Error(`data: ${meta.rows} rows do not match the arrays' sizes`);
  }
  return out;
}

function setData(data) {
  shard = arrays(data);
  queue = [];
  return shard.rows;
}

// xorshift32 for the epoch shuffles: seeded per tab, so batches differ between tabs.
function nextRand() {
  rng ^= rng << 13; rng >>>= 0; rng ^= rng >>> 17; rng ^= rng << 5; rng >>>= 0;
  return rng;
}

function nextRows(n) {
  const out = [];
  while (out.length < n) {
    if (queue.length === 0) {
      queue = Array.from({ length: shard.rows }, (_, i) => i);
      for (let i = queue.length - 1; i > 0; i--) {
        const j = nextRand() % (i + 1);
        [queue[i], queue[j]] = [queue[j], queue[i]];
      }
    }
    out.push(queue.pop());
  }
  return out;
}

function batch(batchSize) {
  const rows = nextRows(batchSize);
  const { xCols, yCols, lm } = shard;
  const x = lm ? new BigInt64Array(batchSize * xCols) : new Float32Array(batchSize * xCols);
  const y = new BigInt64Array(batchSize * yCols);
  rows.forEach((r, b) => {
    for (let c = 0; c < xCols; c++) x[b * xCols + c] = lm ? BigInt(shard.x[r * xCols + c]) : shard.x[r * xCols + c];
    for (let c = 0; c < yCols; c++) y[b * yCols + c] = BigInt(shard.y[r * yCols + c]);
  });
  const xDims = [batchSize, xCols];
  const yDims = lm ? [batchSize, yCols] : [batchSize];
  return {
    x: new ort.Tensor(lm ? 'int64' : 'float32', x, xDims),
    y: new ort.Tensor('int64', y, yDims),
  };
}

function waitResume() {
  return paused ? new Promise((resolve) => resumeWaiters.push(resolve)) : null;
}

/** One train step; returns [loss, newParams, newM, newV] as Float32Arrays. */
async function step(params, m, v, lr, stepNo, xy) {
  const n = params.length;
  const out = await train.run({
    params: new ort.Tensor('float32', params, [n]),
    exp_avg: new ort.Tensor('float32', m, [n]),
    exp_avg_sq: new ort.Tensor('float32', v, [n]),
    lr: new ort.Tensor('float32', Float32Array.of(lr), []),
    step: new ort.Tensor('float32', Float32Array.of(stepNo), []),
    x: xy.x, y: xy.y,
  });
  const f = (name) => out[name].data;
  return [f('loss')[0], f('new_params'), f('new_exp_avg'), f('new_exp_avg_sq')];
}

// Let queued messages (cancel, pause) in between two steps: ORT's run() can resolve through
// microtasks only, and a loop of awaits on it would then never see a message until the end.
const tick = new MessageChannel();
let tickWaiters = [];
tick.port1.onmessage = () => { const w = tickWaiters; tickWaiters = []; w.forEach((r) => r()); };
function yieldToMessages() {
  return new Promise((resolve) => { tickWaiters.push(resolve); tick.port2.postMessage(0); });
}

// shared.autotune.continue_training, the rule every runtime applies: another step while below
// `steps` and, with a time budget, while it ends within the budget at the mean pace so far
function continueTraining(done, maxSteps, elapsedS, budgetS) {
  if (done >= maxSteps) return false;
  if (budgetS === null || budgetS === undefined || done === 0) return true;
  return elapsedS + elapsedS / done <= budgetS;
}

async function runRound({ round, params, steps, lr, batchSize, budgetS = null, from = null,
  done0 = 0, lossSum0 = 0, compute0 = 0 }) {
  if (!shard) throw new Error('no training data yet');
  let p = from ?? new Float32Array(params);  // from: merged steps run ahead (ahead.js)
  if (!moments || moments.m.length !== p.length) {
    moments = { m: new Float32Array(p.length), v: new Float32Array(p.length), step: 0 };
  }
  let compute = compute0;
  let lossSum = lossSum0;
  let done = done0;
  const started = performance.now();
  while (continueTraining(done, steps, (performance.now() - started) / 1000, budgetS)) {
    await yieldToMessages();
    if (cancelled.has(round)) break;
    const wait = waitResume();
    if (wait) await wait;
    if (cancelled.has(round)) break;
    const xy = batch(batchSize);
    const t0 = performance.now();
    const [loss, np, nm, nv] = await step(p, moments.m, moments.v, lr, moments.step + 1, xy);
    const ms = performance.now() - t0;
    p = np; moments.m = nm; moments.v = nv; moments.step += 1;
    compute += ms; lossSum += loss; done += 1;
    post({ type: 'step', round, step: done, loss, ms });
  }
  if (cancelled.has(round) || done === 0) {
    cancelled.delete(round);
    post({ type: 'cancelled', round, steps: done });
    return;
  }
  const trainLoss = Number.isFinite(lossSum / done) ? lossSum / done : null;
  local = p;
  const start = new Float32Array(params);
  const delta = new Float32Array(p.length);  // the pseudo-gradient theta_r - theta_i
  for (let i = 0; i < p.length; i++) delta[i] = start[i] - p[i];
  post({ type: 'done', round, delta: delta.buffer, trainLoss, samples: done * batchSize,
    computeS: compute / 1000, steps: done }, [delta.buffer]);
}

/** Overlap: the next round's steps from `local` until its 'round' (merge) comes, `steps`
 * are done, or they are abandoned; a merge that came meanwhile finishes the round now. */
async function runAhead({ afterRound, steps, lr, batchSize }) {
  if (!local || !shard || !moments) return;
  const a = new AheadRun({ after: afterRound, start: local, steps, lr, batchSize });
  ahead = a;
  while (a.goesOn()) {
    await yieldToMessages();
    const wait = waitResume();
    if (wait) await wait;
    if (!a.goesOn()) break;
    const t0 = performance.now();
    const [loss, np, nm, nv] = await step(a.p, moments.m, moments.v, lr, moments.step + 1, batch(batchSize));
    a.compute += performance.now() - t0;
    a.p = np; moments.m = nm; moments.v = nv; moments.step += 1;
    a.lossSum += loss; a.done += 1;
    post({ type: 'step', round: afterRound + 1, step: a.done, loss, ms: performance.now() - t0, ahead: true });
  }
  a.running = false;
  if (a.stop || ahead !== a) { if (ahead === a) ahead = null; return; }
  if (a.rebase) { ahead = null; await runRound(a.merged(a.rebase)); }
}

async function runInfer({ id, params, x, dims, xType }) {
  const p = new Float32Array(params);
  const xt = xType === 'int64'
    ? new ort.Tensor('int64', BigInt64Array.from(x, (v) => BigInt(v)), dims)
    : new ort.Tensor('float32', Float32Array.from(x), dims);
  const out = await infer.run({ params: new ort.Tensor('float32', p, [p.length]), x: xt });
  const logits = new Float32Array(out.logits.data);
  post({ type: 'infer', id, logits: logits.buffer, dims: out.logits.dims }, [logits.buffer]);
}

/** The same step `steps` times on the shard's first `batchSize` rows, from zero moments:
 * per-step wall times, and the last run's loss and new params (for parity checks). */
/** Mean held-out loss (nats, as ml.zoo.evaluate) of each params vector on `val`. */
async function runScore({ id, candidates }) {
  if (!val) throw new Error('no validation data');
  const { lm, rows, xCols, yCols } = val;
  const losses = [];
  for (const buf of candidates) {
    const p = new Float32Array(buf);
    const pt = new ort.Tensor('float32', p, [p.length]);
    let total = 0;
    for (let start = 0; start < rows; start += 128) {
      const b = Math.min(128, rows - start);
      const xs = val.x.subarray(start * xCols, (start + b) * xCols);
      const x = lm ? new ort.Tensor('int64', BigInt64Array.from(xs, (v) => BigInt(v)), [b, xCols])
        : new ort.Tensor('float32', Float32Array.from(xs), [b, xCols]);
      const out = await infer.run({ params: pt, x });
      const logits = out.logits.data;
      const V = out.logits.dims[out.logits.dims.length - 1];
      let sum = 0;
      for (let r = 0; r < b * yCols; r++) {  // cross-entropy of each target position
        const row = logits.subarray(r * V, (r + 1) * V);
        let max = -Infinity;
        for (let k = 0; k < V; k++) if (row[k] > max) max = row[k];
        let z = 0;
        for (let k = 0; k < V; k++) z += Math.exp(row[k] - max);
        sum += Math.log(z) + max - row[val.y[start * yCols + r]];
      }
      total += sum / yCols;
    }
    losses.push(total / rows);
  }
  post({ type: 'score', id, losses });
}

async function runBench({ params, steps, warmup = 2, batchSize }) {
  const p = new Float32Array(params);
  const m = new Float32Array(p.length);
  const v = new Float32Array(p.length);
  queue = Array.from({ length: batchSize }, (_, i) => batchSize - 1 - i);  // rows 0..B-1
  const xy = batch(batchSize);
  const times = [];
  let last = null;
  for (let i = 0; i < warmup + steps; i++) {
    const t0 = performance.now();
    last = await step(p, m, v, 1e-3, 1, xy);
    if (i >= warmup) times.push(performance.now() - t0);
  }
  const out = new Float32Array(last[1]);
  const m1 = new Float32Array(last[2]);  // from zero moments: 0.1 x the clipped gradient
  post({ type: 'bench', stepMs: times, loss: last[0], params: out.buffer, expAvg: m1.buffer },
    [out.buffer, m1.buffer]);
}

async function handle(msg) {
  switch (msg.type) {
    case 'init': {
      const t0 = performance.now();
      const threads = await loadOrt(msg.backend);
      // graphs.train null: this tab cannot train the model (node.js says why), inference only
      [train, infer] = await Promise.all([msg.graphs.train ? session(msg.graphs.train, msg.backend) : null,
        session(msg.graphs.infer, msg.backend)]);
      if (msg.seed !== undefined) rng = (msg.seed >>> 0) || 0x9e3779b9;
      if (msg.data) setData(msg.data);
      if (msg.val) val = arrays(msg.val);
      info = { backend: msg.backend, threads };
      post({ type: 'ready', ...info, loadMs: performance.now() - t0 });
      break;
    }
    case 'data':
      if (msg.seed !== undefined) rng = (msg.seed >>> 0) || 0x9e3779b9;
      post({ type: 'data', rows: setData(msg.data), source: msg.source });
      break;
    case 'val': val = arrays(msg.data); post({ type: 'data', rows: val.rows, source: 'val' }); break;
    case 'round':  // merge: the steps run ahead (done, else runAhead merges them) are its own
      if (msg.merge && ahead && !ahead.stop) { const a = ahead; ahead = null; await runRound(a.merged(msg)); break; }
      ahead = null;
      await runRound(msg);
      break;
    case 'ahead': await runAhead(msg); break;
    case 'infer': await runInfer(msg); break;
    case 'bench': await runBench(msg); break;
    case 'score': await runScore(msg); break;
    default: throw new Error(`unknown message ${msg.type}`);
  }
}

// pause / resume / cancel act at once; everything else runs in order, one at a time.
let chain = Promise.resolve();
self.onmessage = (ev) => {
  const msg = ev.data;
  if (msg.type === 'pause') { paused = true; return; }
  if (msg.type === 'resume') {
    paused = false;
    resumeWaiters.splice(0).forEach((r) => r());
    return;
  }
  if (msg.type === 'cancel') { cancelled.add(msg.round); return; }
  if (msg.type === 'ahead_stop' || (msg.type === 'round' && !msg.merge)) {  // abandon steps ahead
    if (ahead) ahead.stop = true;
    if (msg.type === 'ahead_stop') return;
  }
  if (msg.type === 'round' && msg.merge && ahead?.running && !ahead.stop) { ahead.rebase = msg; return; }
  chain = chain.then(() => handle(msg)).catch((err) => post({
    type: 'error', message: String(err && err.message ? err.message : err), during: msg.type,
    round: msg.round,
  }));
};
