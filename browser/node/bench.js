// The train-step benchmark page (bench/browser.py drives it): the run's ONNX train step in
// train_worker.js on the first rows of the whole training set, `?backend=wasm|webgpu`,
// `&steps=N`, `&batch=B`. Result in window.__bench: {backend, threads, loadMs, stepMs[],
// loss, params (the step's new params) and expAvg (its new first moment), as plain arrays, n}.

import { fetchArrays } from './data.js';

const q = new URLSearchParams(location.search);
const backend = q.get('backend') || 'wasm';
const steps = Number(q.get('steps') || 10);
const batchSize = Number(q.get('batch') || 32);

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
  worker.postMessage({ type: 'bench', params, steps, batchSize, warmup: backend === 'webgpu' ? 1 : 2 });
  const res = await next();
  const out = new Float32Array(res.params);
  window.__bench = { backend: ready.backend, threads: ready.threads, loadMs: ready.loadMs,
    stepMs: res.stepMs, loss: res.loss, params: Array.from(out),
    expAvg: Array.from(new Float32Array(res.expAvg)), n: out.length };
  document.getElementById('status').textContent = 'done';
}

main().catch((err) => { window.__bench = { error: String(err.message || err) }; });
