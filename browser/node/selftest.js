// The self-test page: the JS protocol code against the golden vectors, then `shared` inside
// Pyodide. Results land in window.__results (read by e2e/test_golden_in_browser.py) and in
// a table on the page. window.daa exposes the modules for the e2e interop checks.

import * as codecs from './codecs.js';
import * as floatbits from './floatbits.js';
import * as frame from './frame.js';
import { checkCodecs, checkFrames } from './golden.js';
import * as identity from './identity.js';
import * as messages from './messages.js';
import { loadShared, SITE_DIR } from './pyodide_host.js';
import * as zstd from './zstd.js';

const results = { status: 'running', crossOriginIsolated: globalThis.crossOriginIsolated === true };
window.__results = results;
window.daa = { codecs, floatbits, frame, identity, messages, zstd };

async function getJson(url) {
  const resp = await fetch(url, { cache: 'no-cache' });
  if (!resp.ok) throw new Error(`GET ${url}: HTTP ${resp.status}`);
  return resp.json();
}

function show(checks) {
  const table = document.getElementById('checks');
  for (const c of checks) {
    const row = table.insertRow();
    row.className = c.ok ? 'ok' : 'fail';
    row.insertCell().textContent = c.ok ? 'ok' : 'FAIL';
    row.insertCell().textContent = c.name;
    row.insertCell().textContent = c.error ?? c.detail ?? '';
  }
}

async function main() {
  const t0 = performance.now();
  const [codecDoc, frameDoc] = await Promise.all([
    getJson('/pkg/testdata/codecs.json'), getJson('/pkg/testdata/frames.json')]);
  await zstd.initZstd();
  results.js = { codecs: checkCodecs(codecDoc), frames: checkFrames(frameDoc), ms: performance.now() - t0 };
  show([...results.js.codecs, ...results.js.frames]);
  const skipPy = new URLSearchParams(location.search).has('nopy');
  if (!skipPy) {
    const t1 = performance.now();
    const { pyodide, sha256, timings } = await loadShared();
    window.pyodide = pyodide;
    const code = await (await fetch('./selftest_py.py', { cache: 'no-cache' })).text();
    const ns = pyodide.globals.get('dict')();
    pyodide.runPython(code, { globals: ns, filename: 'selftest_py.py' });
    const t2 = performance.now();
    const out = JSON.parse(ns.get('run')(`${SITE_DIR}/shared/testdata`));
    ns.destroy();
    results.pyodide = { ...out, zip_sha256: sha256, load_ms: t2 - t1, ...timings, run_ms: performance.now() - t2 };
    show(out.checks);
  }
  const all = [...results.js.codecs, ...results.js.frames, ...(results.pyodide?.checks ?? [])];
  const failed = all.filter((c) => !c.ok).length;
  document.getElementById('status').textContent = `${all.length} checks, ${failed} failed; `
    + `crossOriginIsolated = ${results.crossOriginIsolated}`;
  results.status = 'done';
}

main().catch((exc) => {
  results.status = 'error';
  results.error = `${exc.name}: ${exc.message}\n${exc.stack ?? ''}`;
  document.getElementById('status').textContent = results.error;
});
