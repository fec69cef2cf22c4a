// The train-step benchmark page (bench/browser.py drives it): the run's ONNX train step in
// train_worker.js on the first rows of the whole training set, `?backend=wasm|webgpu`,
// `&steps=N`, `&batch=B`, `&warmup=W`. Result in window.__bench: {backend, threads, loadMs,
// stepMs[], loss, params (the step's new params) and expAvg (its new first moment), as plain
// arrays, n}. `&every=K` returns every K-th entry of those two only (large models);
// `&memory=1` adds what the tab reports of its memory after the steps, the worker included
// (performance.measureUserAgentSpecificMemory, which needs cross-origin isolation).

import { fetchArrays } from './data.js';

const q = new URLSearchParams(location.search);
const backend = q.get('backend') || 'wasm';
const steps = Number(q.get('steps') || 10);
const batchSize = Number(q.get('batch') || 32);
const every = Math.max(1, Number(q.get('every') || 1));
const warmupSteps = q.get('warmup');

async function tabMemory() {
  const mem = { jsHeapUsed: performance.memory ? performance.memory.usedJSHeapSize : null };
  if (!performance.measureUserAgentSpecificMemory) {
    mem.error = 'performance.measureUserAgentSpecificMemory is not available (no cross-origin isolation)';
    return mem;
  }
  try {
    const m = await performance.measureUserAgentSpecificMemory();
    mem.bytes = m.bytes;
    mem.workerBytes = m.breakdown.filter((e) => e.attribution.some((a) => a.scope === 'DedicatedWorkerGlobalScope'))
      .reduce((sum, e) => sum + e.bytes, 0);
  } catch (err) { mem.error = String(err.message || err); }
  return mem;
}
const sample = (buf) => Array.from(new Float32Array(buf).filter((_, i) => i % every === 0));

async function main() {
  const data = await fetchArrays('/data/shard?shard=0&n_shards=1');
  const params = await (await fetch('/model/params.bin')).arrayBuffer();
  const worker = new Worker(new URL('./train_worker.js', import.meta.url), { type: 'module' });
  const next = () => new Promise((resolve, reject) => {
    worker.onmessage = (ev) => (ev.data.type === 'error' ? reject(new Error(ev.data.message)) : resolve(ev.data));
  });
  worker.postMessage({ type: 'init', backend, seed: 1, data,
    graphs: { train: '/model/onnx/train_step.onnx', infer: '/model/onnx/infer.onnx' } }, [data.x, data.y]);
  const ready = await next();
  const warmup = warmupSteps !== null ? Number(warmupSteps) : (backend === 'webgpu' ? 1 : 2);
  worker.postMessage({ type: 'bench', params, steps, batchSize, warmup });
  const res = await next();
  const memory = q.get('memory') === '1' ? await tabMemory() : null;
  window.__bench = { backend: ready.backend, threads: ready.threads, loadMs: ready.loadMs,
    stepMs: res.stepMs, loss: res.loss, params: sample(res.params), expAvg: sample(res.expAvg),
    n: res.params.byteLength / 4, every, memory };
  document.getElementById('status').textContent = 'done';
}

main().catch((err) => { window.__bench = { error: String(err.message || err) }; });
