// Overlapped rounds in the tab (run option overlap, shared/overlap.py), for train_worker.js:
// right after the tab submits round t, its train worker runs round t+1's inner steps from
// where round t's steps ended (`local`), while round t is uploaded, aggregated and committed.
// When round t+1 opens (its 'round' message has merge: true, the participant's Ahead said so)
// the progress is moved onto the new global params and the worker trains the rest of H:
//
//   merged = theta_{t+1} + (local_now - local_start)     (float32, shared.overlap.merge)
//
// and the update is the ordinary theta_{t+1} - final. A 'round' without merge (the participant
// dropped the steps ahead) or 'ahead_stop' (the run ended) abandons them.

/** shared.overlap.merge: f32(theta + f32(local - start)), element by element. */
export function mergeParams(theta, local, start) {
  const n = theta.length;
  if (local.length !== n || start.length !== n) throw new Error(`merge: lengths ${n}, ${local.length}, ${start.length}`);
  const out = new Float32Array(n);
  const fr = Math.fround;
  for (let i = 0; i < n; i++) out[i] = theta[i] + fr(local[i] - start[i]);  // the store rounds
  return out;
}

/** Steps run ahead after the Submit of `after`: from `start`, `p` now, `done` of them. The
 * worker's message handler sets `rebase` (the next round's 'round' message, merge: true) or
 * `stop` while they run. */
export class AheadRun {
  constructor({ after, start, steps, lr, batchSize }) {
    Object.assign(this, { after, start, steps, lr, batchSize });
    this.p = start;
    this.done = 0;
    this.lossSum = 0;
    this.compute = 0;  // ms
    this.running = true;
    this.rebase = null;
    this.stop = false;
  }

  /** Whether another step runs ahead now (not when its round opened or it was abandoned). */
  goesOn() { return this.done < this.steps && this.rebase === null && !this.stop; }

  /** The merged round's runRound arguments: the round's message, from the merged params,
   * with the steps, loss and compute made ahead already counted. */
  merged(msg) {
    const from = mergeParams(new Float32Array(msg.params), this.p, this.start);
    return { ...msg, from, done0: this.done, lossSum0: this.lossSum, compute0: this.compute };
  }
}
