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
