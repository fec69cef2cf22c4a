// What the tab does with the model for the person in front of it (no network): turn a local
// text file into training windows, sample text from logits, softmax class probabilities.

/** A text as token windows of `context` + 1 symbols (stride context / 2): x = w[:-1],
 * y = w[1:]. Characters outside `vocab` are skipped and counted. */
export function textWindows(text, vocab, context) {
  const index = new Map(vocab.map((s, i) => [s, i]));
  const ids = [];
  let skipped = 0;
  for (const ch of text) { const i = index.get(ch); if (i === undefined) skipped++; else ids.push(i); }
  const T = context;
  const stride = Math.max(1, T >> 1);
  const rows = ids.length > T ? Math.floor((ids.length - T - 1) / stride) + 1 : 0;
  if (rows < 1) throw new Error(`need more than ${T + 1} characters the model knows (found ${ids.length}, ${skipped} unknown)`);
  const x = new Int32Array(rows * T);
  const y = new Int32Array(rows * T);
  for (let r = 0; r < rows; r++) {
    for (let t = 0; t < T; t++) { x[r * T + t] = ids[r * stride + t]; y[r * T + t] = ids[r * stride + t + 1]; }
  }
  return { meta: { task: 'lm', rows, x_cols: T, y_cols: T }, x, y, skipped };
}

/** Continue `prompt` by `n` symbols; `infer(ids)` gives the logits [1, len, V] of a context. */
export async function generateText(infer, vocab, context, prompt, n, temperature) {
  const index = new Map(vocab.map((s, i) => [s, i]));
  let ids = [...prompt].map((c) => index.get(c)).filter((i) => i !== undefined);
  if (ids.length === 0) ids = [0];
  let out = '';
  for (let k = 0; k < n; k++) {
    const ctx = ids.slice(-context);
    const { logits, dims } = await infer(ctx);
    const V = dims[2];
    const row = logits.subarray((ctx.length - 1) * V, ctx.length * V);
    const max = Math.max(...row);
    const w = Array.from(row, (l) => Math.exp((l - max) / temperature));
    let u = Math.random() * w.reduce((a, b) => a + b, 0);
    let next = 0;
    while (next < V - 1 && (u -= w[next]) > 0) next++;
    ids.push(next);
    out += vocab[next];
  }
  return out;
}

export function softmax(logits) {
  const max = Math.max(...logits);
  const e = Array.from(logits, (l) => Math.exp(l - max));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

// -- what the run learns, and whether a file fits it --------------------------------------
const SAMPLE_ROWS = 4000;        // shard rows the reference statistics are counted on
const MAX_UNKNOWN = 0.05;        // a file with more characters outside the vocabulary is refused
const CE_SLACK = 1.5;            // ... and one whose bigram cross-entropy exceeds
const CE_MARGIN = 0.5;           //     CE_SLACK x the run's own + CE_MARGIN nats

function rowsOf(data) {
  const { meta } = data;
  return { x: new Int32Array(data.x), rows: meta.rows, cols: meta.x_cols };
}

function ranges(vocab) {
  // "a-z, A-F" for runs of consecutive code points; other symbols as they are
  const out = [];
  let i = 0;
  while (i < vocab.length) {
    let j = i;
    while (j + 1 < vocab.length && vocab[j + 1].codePointAt(0) === vocab[j].codePointAt(0) + 1) j++;
    const show = (c) => (c === ' ' ? 'space' : c === '\n' ? 'newline' : c);
    out.push(j - i >= 2 ? `${show(vocab[i])}–${show(vocab[j])}` : vocab.slice(i, j + 1).map(show).join(', '));
    i = j + 1;
  }
  return out.join(', ');
}

/** Smoothed bigram log-probabilities of the run's own training rows, and their held-out
 * cross-entropy (even rows fit, odd rows scored): what a file is compared with. */
export function bigramReference(data, vocab) {
  if (!vocab || !data || data.meta.task !== 'lm') return null;
  const V = vocab.length;
  const { x, rows, cols } = rowsOf(data);
  const n = Math.min(rows, SAMPLE_ROWS);
  const counts = new Float64Array(V * V);
  for (let r = 0; r < n; r += 2) {
    for (let t = 0; t + 1 < cols; t++) counts[x[r * cols + t] * V + x[r * cols + t + 1]] += 1;
  }
  const logp = new Float64Array(V * V);
  for (let a = 0; a < V; a++) {
    let total = 0;
    for (let b = 0; b < V; b++) total += counts[a * V + b] + 0.5;
    for (let b = 0; b < V; b++) logp[a * V + b] = Math.log((counts[a * V + b] + 0.5) / total);
  }
  let sum = 0;
  let k = 0;
  for (let r = 1; r < n; r += 2) {
    for (let t = 0; t + 1 < cols; t++) { sum -= logp[x[r * cols + t] * V + x[r * cols + t + 1]]; k++; }
  }
  return { V, logp, ceSelf: k ? sum / k : NaN, alphabet: ranges(vocab) };
}

/** Does `text` fit what the run learns? {ok, reason, unknownFrac, ce, ceSelf}: refused when
 * more than 5% of its characters are outside the run's vocabulary, or when its character
 * statistics (bigram cross-entropy under the run's own data) are far from the run's. */
export function fitCheck(text, vocab, ref) {
  const index = new Map(vocab.map((s, i) => [s, i]));
  const ids = [];
  const unknown = new Map();
  let total = 0;
  for (const ch of text) {
    total++;
    const i = index.get(ch);
    if (i === undefined) unknown.set(ch, (unknown.get(ch) || 0) + 1);
    else ids.push(i);
  }
  const out = { ok: false, reason: '', unknownFrac: 0, ce: null, ceSelf: ref ? ref.ceSelf : null };
  if (total === 0) { out.reason = 'the file is empty'; return out; }
  const nUnknown = total - ids.length;
  out.unknownFrac = nUnknown / total;
  const alphabet = ref ? ref.alphabet : ranges(vocab);
  if (out.unknownFrac > MAX_UNKNOWN) {
    const top = [...unknown.entries()].sort((a, b) => b[1] - a[1]).slice(0, 5)
      .map(([c]) => JSON.stringify(c)).join(' ');
    out.reason = `${(100 * out.unknownFrac).toFixed(0)}% of its characters (${top} …) are not in `
      + `this run's alphabet of ${vocab.length} symbols (${alphabet})`;
    return out;
  }
  if (ref && ids.length > 1) {
    let sum = 0;
    for (let t = 0; t + 1 < ids.length; t++) sum -= ref.logp[ids[t] * ref.V + ids[t + 1]];
    out.ce = sum / (ids.length - 1);
    if (out.ce > CE_SLACK * ref.ceSelf + CE_MARGIN) {
      out.reason = `its characters do not follow the run's statistics: ${out.ce.toFixed(2)} nats per `
        + `character under the run's own data, against ${ref.ceSelf.toFixed(2)} for the run's text; `
        + 'training on it would pull the shared model away from what it learns';
      return out;
    }
  }
  out.ok = true;
  return out;
}

/** What the run learns, in words, with a sample of its training data. */
export function describeData(spec, data, vocab) {
  const kind = spec?.kind;
  if (kind === 'digits' || data?.meta.task === 'classify') {
    return { kind: 'digits', text: 'Handwritten digits: 8 × 8 grey images of 0–9 (scikit-learn\'s digits); '
      + 'the model learns to tell which digit an image shows.', sample: null };
  }
  let sample = null;
  if (data && vocab) {
    const { x, rows, cols } = rowsOf(data);
    const take = [];
    for (let r = 0; r < Math.min(rows, 2); r++) for (let t = 0; t < cols; t++) take.push(vocab[x[r * cols + t]]);
    sample = take.join('').slice(0, 96);
  }
  const alphabet = vocab ? ranges(vocab) : '';
  if (kind === 'markov') {
    return { kind, sample, text: `A synthetic language, not a human one: text generated by a random Markov chain `
      + `over ${vocab ? vocab.length : spec.vocab_size} symbols (${alphabet}). The model learns to predict `
      + 'the next symbol; the entropy floor is the lowest loss any model can reach.' };
  }
  return { kind: kind || 'text', sample, text: `Text from the run's file, ${vocab ? vocab.length : '?'} distinct `
    + `characters (${alphabet}); the model learns to predict the next character.` };
}
