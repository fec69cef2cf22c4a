// The "This tab is training" card on the server's page: starts a BrowserNode (node.js) and
// shows its state live. `?contribute=0` only watches; `?backend=wasm|webgpu` forces a backend;
// `?role=validator` scores other nodes' updates (held-out loss) instead of training.
// The node is also `window.daaNode` (the e2e tests and bench.browser read its stats).

import { BrowserNode } from './node.js';
import { dhtLine } from './dht.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

function text(id, value) { const el = $(id); if (el && el.textContent !== value) el.textContent = value; }

function render(s) {
  const badge = $('node-state');
  text('node-state', s.paused ? 'paused' : s.state);
  badge.className = `badge ${s.state === 'stopped' ? 'badge-unknown' : s.state.startsWith('training') ? 'badge-collecting'
    : s.state === 'the run is finished' ? 'badge-finished' : 'badge-starting'}`;
  const transport = { webrtc: ' · updates over WebRTC', relay: ' · updates relayed (WebSocket)',
    connecting: ' · WebRTC connecting', websocket: '' }[s.transport] ?? '';
  text('node-backend', s.backend ? `${s.backend === 'webgpu' ? 'WebGPU' : 'WebAssembly'}${s.threads ? `, ${s.threads} thread${s.threads > 1 ? 's' : ''}` : ''}${transport}` : '–');
  text('node-id', s.nodeId ? s.nodeId.slice(0, 16) : '–');
  text('node-version', s.round === null ? '–' : `round ${s.round} · ${s.version}`);
  const validator = s.role === 'validator';
  text('node-contributed-label', validator ? 'Candidates judged' : 'Rounds contributed');
  text('node-contributed', String(validator ? s.judged : s.contributed));
  text('node-acks', `${s.accepted} / ${s.rejected}`);
  text('node-speed', s.samplesPerS ? `${s.samplesPerS.toFixed(1)} samples/s` : '–');
  text('node-loss', s.stepLoss === null ? '–' : s.stepLoss.toFixed(4));
  text('node-data', s.rows ? `${s.dataSource === 'server' ? 'shard from the server' : s.dataSource}, ${s.rows} rows` : '–');
  renderDht(s);
  const bar = $('node-progress');
  bar.max = Math.max(1, s.stepsTotal); bar.value = s.stepsDone;
  const notes = [...s.notes, ...s.errors.map((e) => `Error: ${e}`)];
  const ul = $('node-notes');
  if (ul.childElementCount !== notes.length) {
    ul.replaceChildren(...notes.map((n) => Object.assign(document.createElement('li'), { textContent: n })));
  }
  const rej = $('node-rejections');
  if (rej.childElementCount !== s.rejections.length) {
    rej.replaceChildren(...s.rejections.map((r) => Object.assign(document.createElement('li'),
      { textContent: `round ${r.round}: ${r.code}: ${r.message}` })));
  }
  const finished = s.state === 'the run is finished';
  const toggle = $('node-toggle');
  toggle.disabled = s.state === 'stopped' || finished;
  toggle.hidden = finished;
  toggle.textContent = s.paused ? 'Resume' : 'Pause';
  toggle.setAttribute('aria-pressed', String(!!s.paused));
  $('try-lm').hidden = s.task !== 'lm';
  $('try-digit').hidden = s.task !== 'classify';
  $('own-data').hidden = s.task === 'classify' || validator || finished;
  renderFinished(s, finished, validator);
  renderLearns(s);
  renderOwnDataCheck(s);
}

/** A finished run: the card says so and offers the final model (download, try it). */
/** One line under the tiles when the tab runs a DHT node (dht.js). */
function renderDht(s) {
  let el = $('node-dht');
  if (!el && s.dht) {
    el = Object.assign(document.createElement('p'), { id: 'node-dht', className: 'muted' });
    $('node-progress')?.after(el);
  }
  if (el) { el.hidden = !s.dht; text('node-dht', dhtLine(s.dht)); }
}

function renderFinished(s, finished, validator) {
  $('node-finished').hidden = !finished;
  if (finished) {
    text('node-title', 'The run is finished');
    text('node-state', 'finished');
  } else {
    }
}

/** What the run learns (the data, in words, and a sample of it). */
function renderLearns(s) {
  const box = $('node-learns');
  box.hidden = !s.learns;
  if (!s.learns) return;
  text('node-learns-text', s.learns.text);
  $('node-learns-sample-row').hidden = !s.learns.sample;
  text('node-learns-sample', s.learns.sample || '');
}

/** The verdict on the contributor's own file: refused with the reason, or used. */
function renderOwnDataCheck(s) {
  const el = $('node-file-status');
  const c = s.ownDataCheck;
  el.classList.toggle('refused', !!(c && !c.ok));
  if (s.ownDataNote) text('node-file-status', s.ownDataNote);
}

function setupDigitPad(node) {
  const canvas = $('try-canvas');
  const ctx = canvas.getContext('2d');
  const clear = () => { ctx.fillStyle = '#000'; ctx.fillRect(0, 0, canvas.width, canvas.height); text('try-pred', ''); };
  clear();
  let down = false;
  const draw = (ev) => {
    if (!down) return;
    const r = canvas.getBoundingClientRect();
    ctx.fillStyle = '#fff';
    ctx.beginPath();
    ctx.arc(ev.clientX - r.left, ev.clientY - r.top, 9, 0, 2 * Math.PI);
    ctx.fill();
  };
  canvas.addEventListener('pointerdown', (ev) => { down = true; draw(ev); });
  canvas.addEventListener('pointermove', draw);
  canvas.addEventListener('pointerup', async () => {
    down = false;
    // 8 x 8 cells, the mean brightness of each in [0, 1] (sklearn digits are 8 x 8, 0..16)
    const img = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    const cell = canvas.width / 8;
    const px = [];
    for (let gy = 0; gy < 8; gy++) {
      for (let gx = 0; gx < 8; gx++) {
        let sum = 0;
        for (let y = gy * cell; y < (gy + 1) * cell; y++) for (let x = gx * cell; x < (gx + 1) * cell; x++) sum += img[(y * canvas.width + x) * 4];
        px.push(sum / (cell * cell * 255));
      }
    }
    try {
      const p = await node.classify(px);
      const best = p.indexOf(Math.max(...p));
      text('try-pred', `looks like a ${best} (${(100 * p[best]).toFixed(0)}%)`);
    } catch (err) { text('try-pred', String(err.message || err)); }
  });
  $('try-clear').addEventListener('click', clear);
}

async function runFinished() {
  const run = await fetch('/api/run', { cache: 'no-store' }).then((r) => r.json()).catch(() => null);
  return !!run && run.status === 'finished';
}

async function main() {
  if (params.get('contribute') === '0') { $('node-card').hidden = true; return; }
  const role = params.get('role') === 'validator' ? 'validator' : 'trainer';
  const node = new BrowserNode({ backend: params.get('backend') || 'auto', role });
  window.daaNode = node;
  node.addEventListener('change', () => render(node.stats));
  render(node.stats);
  $('node-toggle').addEventListener('click', () => (node.stats.paused ? node.resume() : node.pause()));
  $('node-file').addEventListener('change', async (ev) => {
    const file = ev.target.files[0];
    if (!file) return;
    text('node-file-status', `checking ${file.name} …`);
    try {
      const r = await node.useOwnText(file);
      text('node-file-status', r.pending ? 'will be checked and used once the model is loaded'
        : `using ${r.rows} windows from ${file.name}: it fits what the run learns`);
    } catch (err) { text('node-file-status', `${file.name}: ${String(err.message || err)}`); }
  });
  $('try-generate').addEventListener('click', async () => {
    text('try-out', '…');
    try {
      const prompt = $('try-prompt').value;
      text('try-out', prompt + await node.generate(prompt, 80));
    } catch (err) { text('try-out', String(err.message || err)); }
  });
  setupDigitPad(node);
  // the page paints and polls first; the node's start-up work follows
  await new Promise((r) => setTimeout(r, 0));
  const start = (await runFinished()) ? node.startFinished() : node.start();
  start.catch((err) => node.fail(`cannot start: ${err.message || err}`));
}

main();
