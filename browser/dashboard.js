// DAA Prime status dashboard: polls the JSON API every 2 s and renders it.
// No dependencies. Every server-provided string goes into the DOM through
// textContent / setAttribute, never innerHTML.

const POLL_MS = 2000;
const ROUNDS_PAGE = 1000;
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  runId: null,
  run: null,
  rounds: [],      // committed rounds, ordered by round
  lastRound: -1,   // `since` for the next /api/rounds call
  peers: [],
  skewMs: 0,       // server clock minus client clock, from the Date header
  chartWidth: 0,
};

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- formatting

function fmtBytes(n) {
  if (typeof n !== "number" || !isFinite(n)) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  if (i === 0) return `${Math.round(n)} B`;
  return `${n < 10 ? n.toFixed(2) : n < 100 ? n.toFixed(1) : n.toFixed(0)} ${units[i]}`;
}

function fmtCount(n) {
  if (typeof n !== "number" || !isFinite(n)) return "–";
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e4) return `${(n / 1e3).toFixed(1)}k`;
  return String(n);
}

function fmtLoss(x) {
  return typeof x === "number" && isFinite(x) ? x.toFixed(4) : "–";
}

function fmtAgo(unixS) {
  if (typeof unixS !== "number" || !isFinite(unixS)) return "–";
  const nowS = (Date.now() + state.skewMs) / 1000;
  const s = Math.max(0, Math.round(nowS - unixS));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

function fmtNum(x) {
  if (typeof x !== "number" || !isFinite(x)) return String(x ?? "–");
  if (Number.isInteger(x)) return String(x);
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(1) : String(+x.toPrecision(4));
}

// ---------------------------------------------------------------- DOM helpers

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(typeof c === "string" ? document.createTextNode(c) : c);
  }
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function setText(id, text) {
  const node = $(id);
  if (node.textContent !== text) node.textContent = text;
}

// ---------------------------------------------------------------- fetching

async function getJSON(url) {
  const res = await fetch(url, { cache: "no-store", headers: { Accept: "application/json" } });
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  const date = Date.parse(res.headers.get("Date") || "");
  if (!Number.isNaN(date)) {
    // The header has 1 s resolution; only correct for a real skew.
    const skew = date + 500 - Date.now();
    state.skewMs = Math.abs(skew) > 2000 ? skew : 0;
  }
  return res.json();
}

async function fetchNewRounds() {
  const fresh = [];
  for (;;) {
    const page = await getJSON(`/api/rounds?since=${state.lastRound}&limit=${ROUNDS_PAGE}`);
    if (!Array.isArray(page)) throw new Error("/api/rounds: not an array");
    for (const r of page) {
      if (typeof r?.round === "number" && r.round > state.lastRound) {
        fresh.push(r);
        state.lastRound = r.round;
      }
    }
    if (page.length < ROUNDS_PAGE) return fresh;
  }
}

function resetRounds() {
  state.rounds = [];
  state.lastRound = -1;
}

async function poll() {
  try {
    const [run, peers] = await Promise.all([getJSON("/api/run"), getJSON("/api/peers")]);
    if (run.run_id !== state.runId
        || (typeof run.committed_rounds === "number" && run.committed_rounds < state.rounds.length)) {
      state.runId = run.run_id;
      resetRounds();
    }
    const fresh = await fetchNewRounds();
    state.run = run;
    state.peers = Array.isArray(peers) ? peers : [];
    if (fresh.length) state.rounds.push(...fresh);
    setOnline(true);
    render(fresh.length > 0);
  } catch (err) {
    console.warn("dashboard poll failed:", err);
    setOnline(false);
    // keep what is on screen; refresh the relative times only
    if (state.run) renderPeers();
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

function setOnline(ok) {
  $("offline").hidden = ok;
  document.body.classList.toggle("is-offline", !ok);
}

// ---------------------------------------------------------------- rendering

function render(roundsChanged) {
  renderHeader();
  renderWaiting();
  renderFinishedBanner();
  renderTiles();
  renderPeers();
  renderAutotune();
  renderPrivacy();
  const run = state.run;
  const sig = [state.runId, state.rounds.length, state.lastRound, run.entropy_floor, run.eval_loss_init].join("|");
  if (roundsChanged || sig !== state.chartSig) {
    state.chartSig = sig;
    renderChart();
  }
}

function renderHeader() {
  const run = state.run;
  const cfg = run.config || {};
  const model = run.model || {};

  const status = ["starting", "collecting", "finished"].includes(run.status) ? run.status : "unknown";
  const badge = $("status");
  badge.className = `badge badge-${status}`;
  setText("status", String(run.status ?? "unknown"));

  setText("run-id", String(run.run_id ?? "–"));
  const name = model.name ?? cfg.model ?? run.model_id ?? "model";
  const flavour = model.flavour ?? cfg.flavour;
  setText("model", [name, flavour, `${fmtCount(run.n_params)} params`]
    .filter((x) => x !== undefined && x !== null && x !== "").join(" · "));
  $("model").title = run.model_id ? `model id ${run.model_id}` : "";

  setText("round", `round ${run.round ?? "–"} · attempt ${run.attempt ?? "–"}`);
  const peersTxt = typeof run.peers_connected === "number"
    ? ` · ${run.peers_connected} peer${run.peers_connected === 1 ? "" : "s"} connected` : "";
  setText("quorum", `${run.updates_in_round ?? 0} / ${cfg.quorum ?? "?"} updates for quorum${peersTxt}`);

  const dl = $("download");
  dl.title = run.params_digest ? `sha256 ${run.params_digest} (after ${run.committed_rounds} rounds)` : "";

  const chips = [
    ["data", run.data?.kind],
    ["H", cfg.inner_steps],
    ["inner lr", cfg.inner_lr],
    ["batch", cfg.batch_size],
    ["outer lr", cfg.outer_lr],
    ["momentum", cfg.outer_momentum],
    ["aggregator", cfg.aggregator],
    ["codec", cfg.codec],
    ["deadline", typeof cfg.deadline_s === "number" ? `${fmtNum(cfg.deadline_s)} s` : undefined],
  ].filter(([, v]) => v !== undefined && v !== null);
  const sig = JSON.stringify(chips);
  const box = $("config");
  if (box.dataset.sig !== sig) {
    box.dataset.sig = sig;
    box.replaceChildren(...chips.map(([k, v]) =>
      el("span", { class: "chip" }, `${k} `, el("b", { text: typeof v === "number" ? fmtNum(v) : String(v) }))));
  }
}

function renderTiles() {
  const run = state.run;
  const cfg = run.config || {};

  // the chart and the tile count the same rounds: whichever of /api/run and /api/rounds is newer
  const committed = typeof run.committed_rounds === "number"
    ? Math.max(run.committed_rounds, state.rounds.length) : null;
  setText("t-rounds", String(committed ?? "–"));
  const target = typeof cfg.rounds === "number" && cfg.rounds > 0 ? `of ${cfg.rounds}` : "no round limit";
  setText("t-rounds-sub", `${target} · ${fmtCount(run.accepted ?? 0)} updates accepted`);

  setText("t-loss", fmtLoss(run.eval_loss));
  const sub = $("t-loss-sub");
  const floor = run.entropy_floor;
  const parts = [];
  if (typeof floor === "number" && typeof run.eval_loss === "number" && floor > 0) {
    const gap = ((run.eval_loss - floor) / floor) * 100;
    parts.push(`gap to floor ${gap.toFixed(1)}%`);
    parts.push(`floor ${floor.toFixed(4)}`);
  } else if (typeof run.eval_loss_init === "number") {
    parts.push(`initial ${fmtLoss(run.eval_loss_init)}`);
  }
  sub.textContent = parts.join(" · ");
  sub.title = typeof run.eval_loss_init === "number" ? `initial eval loss ${fmtLoss(run.eval_loss_init)}` : "";

  const bytes = $("t-bytes");
  const bytesTxt = [`↑ ${fmtBytes(run.bytes_up)}`, `↓ ${fmtBytes(run.bytes_down)}`];
  if (bytes.dataset.sig !== bytesTxt.join("|")) {
    bytes.dataset.sig = bytesTxt.join("|");
    bytes.replaceChildren(...bytesTxt.map((t) => el("span", { text: t })));
  }
  setText("t-bytes-sub", "↑ from nodes · ↓ to nodes");

  setText("t-rejected", String(run.rejected_total ?? 0));
  const codes = Object.entries(run.rejected || {}).sort((a, b) => b[1] - a[1]);
  const list = $("t-rejected-list");
  const sig = JSON.stringify(codes);
  if (list.dataset.sig !== sig) {
    list.dataset.sig = sig;
    const extra = [];
    if (run.duplicates) extra.push(["duplicates", run.duplicates]);
    if (run.retries) extra.push(["retried rounds", run.retries]);
    const items = codes.length
      ? codes.map(([code, n]) => el("li", {}, el("span", { text: String(code) }), el("span", { text: String(n) })))
      : [el("li", {}, el("span", { text: "none" }))];
    for (const [k, n] of extra) {
      items.push(el("li", { class: "muted" }, el("span", { text: k }), el("span", { text: String(n) })));
    }
    list.replaceChildren(...items);
    list.parentElement.title = codes.length ? codes.map(([c, n]) => `${c}: ${n}`).join("\n") : "no rejected updates";
  }
}

const STATES = new Set(["idle", "training", "submitted", "gone"]);

function renderPeers() {
  const peers = [...state.peers].sort((a, b) =>
    (Number(!!b.connected) - Number(!!a.connected)) || ((a.first_seen ?? 0) - (b.first_seen ?? 0)));
  const live = peers.filter((p) => p.connected).length;
  setText("peers-count", peers.length ? `${live} connected · ${peers.length} seen` : "");

  const body = $("peers");
  if (!peers.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: "9", class: "empty", text: "no peers yet" })));
    return;
  }
  body.replaceChildren(...peers.map((p) => {
    const id = String(p.node_id ?? "");
    const st = STATES.has(p.state) ? p.state : "idle";
    const gone = !p.connected || st === "gone";
    return el("tr", { class: `st-${st}${gone ? " gone" : ""}` },
      el("td", {}, el("code", { title: id, text: id.slice(0, 12) })),
      el("td", { text: String(p.runtime ?? "–") }),
      el("td", { text: String(p.device ?? "–") }),
      el("td", { class: "num", text: String(p.shard ?? "–") }),
      el("td", { title: p.connected ? "connected" : "disconnected" },
        el("span", { class: "dot-state" }), String(p.state ?? "–")),
      el("td", { title: typeof p.last_seen === "number" ? new Date(p.last_seen * 1000).toLocaleString() : null,
        text: p.connected ? "connected now" : fmtAgo(p.last_seen) }),
      el("td", { class: "num", text: String(p.updates_accepted ?? 0) }),
      el("td", { class: "num", text: String(p.rejected ?? 0) }),
      el("td", { class: "num", text: `${fmtBytes(p.bytes_up)} / ${fmtBytes(p.bytes_down)}` }),
    );
  }));
}

// ------------------------------------------------- the autonomy loop (issue 22)

/** The autotuner's current settings and its newest changes with their reasons
 * (/api/run's `autotune`; hidden when the run does not tune itself). */
function renderAutotune() {
  const tune = state.run.autotune;
  const card = $("autotune-card");
  card.hidden = !tune?.enabled;
  if (!tune?.enabled) return;
  const s = tune.settings || {};
  const codecs = {};
  for (const c of Object.values(s.codecs || {})) codecs[c] = (codecs[c] || 0) + 1;
  const pins = Object.keys(tune.pins || {});
  const parts = [
    s.budget_s == null ? `H ${s.max_steps}` : `budget ${fmtNum(s.budget_s)} s, at most ${s.max_steps} steps`,
    `deadline ${fmtNum(s.deadline_s)} s`, `quorum ${s.quorum}`,
    Object.keys(codecs).length ? `codecs ${Object.entries(codecs).map(([c, n]) => `${c} ×${n}`).join(", ")}` : "",
    pins.length ? `pinned: ${pins.join(", ")}` : "",
    `${tune.decisions ?? 0} decisions`,
  ].filter(Boolean);
  setText("autotune-settings", parts.join(" · "));
  const lines = [];
  for (const d of [...(tune.recent || [])].reverse()) {
    for (const c of d.changes || []) lines.push({ round: d.round, reason: String(c.reason ?? "") });
  }
  const list = $("autotune-reasons");
  const shown = lines.slice(0, 12);
  list.replaceChildren(...(shown.length ? shown.map((l) => el("li", { text: `round ${l.round}: ${l.reason}` }))
    : [el("li", { class: "muted", text: "no change yet: measuring the first rounds" })]));
}

// ------------------------------------------------- client-level DP (issue 18)

/** One line: epsilon spent so far at delta, the budget, and why the run stopped if the
 * budget did it (/api/run's `dp`; hidden without DP). */
function renderPrivacy() {
  const dp = state.run.dp;
  const line = $("dp-line");
  line.hidden = !dp?.enabled;
  if (!dp?.enabled) return;
  const eps = dp.epsilon == null ? "—" : fmtNum(dp.epsilon);
  const parts = [
    `Differential privacy: ε ${eps} at δ ${dp.delta} (${dp.accountant}, ${dp.steps} rounds)`,
    dp.epsilon_budget ? `budget ε ${fmtNum(dp.epsilon_budget)}` : "",
    `clip ${fmtNum(dp.clip)}, noise σ ${fmtNum(dp.noise_multiplier)}, sampling q ${fmtNum(dp.sample_rate)}`,
    dp.stop_reason ? `stopped: ${dp.stop_reason}` : "",
  ].filter(Boolean);
  line.textContent = parts.join(" · ");
}

// ------------------------------------------------- who the round waits for (issue 23)

const SHORT = (id) => String(id ?? "").slice(0, 8);

/** The header's "waiting for" line: the connected trainers that have not sent this round's
 * update (the server waits for them until the deadline), or why nothing is waited for. */
function renderWaiting() {
  const run = state.run;
  const box = $("waiting");
  if (run.status === "finished") { setText("waiting", ""); return; }
  const trainers = state.peers.filter((p) => p.connected && (p.role ?? "trainer") === "trainer");
  const pending = trainers.filter((p) => p.state !== "submitted");
  const quorum = run.config?.quorum ?? 1;
  const have = run.updates_in_round ?? 0;
  let msg;
  if (run.status !== "collecting") msg = "";
  else if (!trainers.length) msg = `round ${run.round}: waiting for a trainer to connect (quorum ${quorum})`;
  else if (!pending.length) msg = `round ${run.round}: every connected trainer has sent its update; committing`;
  else {
    const who = pending.slice(0, 4).map((p) => `${SHORT(p.node_id)} (${p.runtime ?? "?"}, ${p.state ?? "?"})`);
    const more = pending.length > 4 ? ` and ${pending.length - 4} more` : "";
    const q = have >= quorum ? "quorum reached; " : `${have} of ${quorum} updates for quorum; `;
    msg = `round ${run.round}: ${q}waiting for ${pending.length} of ${trainers.length} trainer${trainers.length === 1 ? "" : "s"}: `
      + `${who.join(", ")}${more}`;
  }
  if (box.textContent !== msg) box.textContent = msg;
}

/** A finished run says so in the header, with the final model. */
function renderFinishedBanner() {
  const run = state.run;
  const done = run.status === "finished";
  $("finished-banner").hidden = !done;
  if (done) {
    setText("finished-text", `This run is finished: ${run.committed_rounds} rounds committed, eval loss `
      + `${fmtLoss(run.eval_loss)}. Nodes no longer train.`);
  }
}

// ---------------------------------------------------------------- chart

function niceStep(range, target) {
  const raw = range / Math.max(1, target);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const f = raw / mag;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * mag;
}

function ticks(lo, hi, step) {
  const out = [];
  const start = Math.ceil(lo / step - 1e-9) * step;
  for (let v = start; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(10));
  return out;
}

function decimalsFor(step) {
  return Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9)));
}

function linePath(points, sx, sy) {
  let d = "";
  let pen = false;
  for (const [x, y] of points) {
    if (typeof y !== "number" || !isFinite(y)) { pen = false; continue; }
    d += `${pen ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`;
    pen = true;
  }
  return d;
}

function renderChart() {
  const box = $("chart");
  const run = state.run;
  const width = Math.floor(box.clientWidth);
  if (!run || width <= 0) return;
  state.chartWidth = width;

  // x = committed rounds after the commit (round index + 1); x = 0 is the initial model.
  const evalPts = [];
  const trainPts = [];
  if (typeof run.eval_loss_init === "number") evalPts.push([0, run.eval_loss_init]);
  for (const r of state.rounds) {
    evalPts.push([r.round + 1, r.eval_loss]);
    trainPts.push([r.round + 1, r.train_loss]);
  }
  const floor = typeof run.entropy_floor === "number" && isFinite(run.entropy_floor) ? run.entropy_floor : null;
  $("legend-floor").hidden = floor === null;
  if (!state.rounds.length) {
    const init = typeof run.eval_loss_init === "number" ? ` (initial eval loss ${fmtLoss(run.eval_loss_init)})` : "";
    box.replaceChildren(el("p", { class: "empty", text: `waiting for the first committed round…${init}` }));
    return;
  }
  const ys = [...evalPts, ...trainPts].map((p) => p[1]).filter((y) => typeof y === "number" && isFinite(y));
  if (!ys.length) {
    box.replaceChildren(el("p", { class: "empty", text: "waiting for the first committed round…" }));
    return;
  }
  if (floor !== null) ys.push(floor);

  const narrow = width < 520;
  const H = narrow ? 220 : 300;
  const m = { top: 14, right: narrow ? 12 : 20, bottom: 40, left: narrow ? 44 : 54 };
  const iw = Math.max(10, width - m.left - m.right);
  const ih = H - m.top - m.bottom;

  let yLo = Math.min(...ys);
  let yHi = Math.max(...ys);
  if (yHi - yLo < 1e-9) { yLo -= 0.5; yHi += 0.5; }
  const yStep = niceStep(yHi - yLo, narrow ? 4 : 6);
  yLo = Math.floor(yLo / yStep) * yStep;
  yHi = Math.ceil(yHi / yStep) * yStep;
  if (yLo < 0 && Math.min(...ys) >= 0) yLo = 0;

  const xMax = Math.max(1, ...evalPts.map((p) => p[0]), ...trainPts.map((p) => p[0]));
  let xStep = Math.max(1, niceStep(xMax, Math.max(2, Math.floor(iw / 70))));
  if (!Number.isInteger(xStep)) xStep = Math.ceil(xStep / 5) * 5 || 1; // rounds are integers: 2.5 -> 5
  const xHi = Math.ceil(xMax / xStep) * xStep;

  const sx = (x) => m.left + (x / xHi) * iw;
  const sy = (y) => m.top + (1 - (y - yLo) / (yHi - yLo)) * ih;

  const root = svg("svg", { viewBox: `0 0 ${width} ${H}`, width, height: H, role: "img",
    "aria-label": "eval and train loss per committed round" });

  // grid + y ticks
  const yDec = decimalsFor(yStep);
  for (const v of ticks(yLo, yHi, yStep)) {
    const y = sy(v);
    root.append(svg("line", { class: "grid", x1: m.left, x2: m.left + iw, y1: y, y2: y }));
    root.append(svg("text", { x: m.left - 8, y: y + 3.5, "text-anchor": "end" }, v.toFixed(yDec)));
  }
  // x ticks
  for (const v of ticks(0, xHi, xStep)) {
    const x = sx(v);
    root.append(svg("line", { class: "axis", x1: x, x2: x, y1: m.top + ih, y2: m.top + ih + 4 }));
    root.append(svg("text", { x, y: m.top + ih + 17, "text-anchor": "middle" }, String(v)));
  }
  // axes
  root.append(svg("line", { class: "axis", x1: m.left, x2: m.left + iw, y1: m.top + ih, y2: m.top + ih }));
  root.append(svg("line", { class: "axis", x1: m.left, x2: m.left, y1: m.top, y2: m.top + ih }));
  root.append(svg("text", { class: "axis-title", x: m.left + iw / 2, y: H - 4, "text-anchor": "middle" },
    "committed round"));
  root.append(svg("text", { class: "axis-title", x: 0, y: 0, "text-anchor": "middle",
    transform: `translate(12 ${m.top + ih / 2}) rotate(-90)` }, "loss (nats)"));

  // entropy floor
  if (floor !== null) {
    const y = sy(floor);
    root.append(svg("line", { class: "floor", x1: m.left, x2: m.left + iw, y1: y, y2: y }));
    // label at the left end: the loss curve starts high there, so it stays clear of it
    root.append(svg("text", { class: "floor-label", x: m.left + 8, y: y - 6, "text-anchor": "start" },
      `entropy floor ${floor.toFixed(3)}`));
  }

  // lines
  const trainD = linePath(trainPts, sx, sy);
  if (trainD) root.append(svg("path", { class: "train", d: trainD }));
  const evalD = linePath(evalPts, sx, sy);
  if (evalD) root.append(svg("path", { class: "eval", d: evalD }));
  const validEval = evalPts.filter((p) => typeof p[1] === "number" && isFinite(p[1]));
  if (validEval.length <= 60) {
    for (const [x, y] of validEval) root.append(svg("circle", { class: "dot", cx: sx(x), cy: sy(y), r: 2.75 }));
  } else if (validEval.length) {
    const [x, y] = validEval[validEval.length - 1];
    root.append(svg("circle", { class: "dot", cx: sx(x), cy: sy(y), r: 3.5 }));
  }

  // hover read-out
  const cursor = svg("line", { class: "cursor", x1: 0, x2: 0, y1: m.top, y2: m.top + ih, visibility: "hidden" });
  root.append(cursor);
  const hit = svg("rect", { x: m.left, y: m.top, width: iw, height: ih, fill: "transparent" });
  root.append(hit);
  const tip = el("div", { class: "tip" });
  tip.hidden = true;

  const byX = new Map();
  for (const [x, y] of evalPts) byX.set(x, { x, eval: y });
  for (const [x, y] of trainPts) byX.set(x, { ...(byX.get(x) || { x }), train: y });
  const xs = [...byX.keys()].sort((a, b) => a - b);

  const show = (evt) => {
    const rect = root.getBoundingClientRect();
    const scale = rect.width / width || 1;
    const px = (evt.clientX - rect.left) / scale;
    const xv = ((px - m.left) / iw) * xHi;
    let best = xs[0];
    for (const x of xs) if (Math.abs(x - xv) < Math.abs(best - xv)) best = x;
    const d = byX.get(best);
    const cx = sx(best);
    cursor.setAttribute("x1", cx);
    cursor.setAttribute("x2", cx);
    cursor.setAttribute("visibility", "visible");
    const lines = [best === 0 ? "initial model" : `after round ${best - 1} (${best} committed)`,
      `eval ${fmtLoss(d.eval)}`];
    if (d.train !== undefined) lines.push(`train ${fmtLoss(d.train)}`);
    tip.replaceChildren(...lines.map((t) => el("div", { text: t })));
    const yRef = typeof d.eval === "number" ? sy(d.eval) : m.top + ih / 2;
    tip.style.left = `${Math.min(Math.max(cx * scale, 70), rect.width - 70)}px`;
    tip.style.top = `${yRef * scale}px`;
    tip.hidden = false;
  };
  const hide = () => { cursor.setAttribute("visibility", "hidden"); tip.hidden = true; };
  hit.addEventListener("pointermove", show);
  hit.addEventListener("pointerdown", show);
  hit.addEventListener("pointerleave", hide);

  box.replaceChildren(root, tip);
}

// ---------------------------------------------------------------- start

function init() {
  $("join-cmd").textContent = `python -m native_node join --coordinator ${location.host || "HOST:PORT"}`;
  if ("ResizeObserver" in window) {
    new ResizeObserver(() => {
      const w = Math.floor($("chart").clientWidth);
      if (state.run && w > 0 && w !== state.chartWidth) renderChart();
    }).observe($("chart"));
  } else {
    window.addEventListener("resize", () => { if (state.run) renderChart(); });
  }
  poll();
}

init();
