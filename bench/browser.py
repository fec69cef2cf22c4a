"""The browser node, measured: time from opening the page to a first accepted update, and
the train step in ONNX Runtime Web (wasm) against native onnxruntime and torch on the CPU.

    python -m bench.browser [--model gpt-tiny] [--steps 20] [--batch 32] [--no-webgpu]
    python -m bench.browser --models llama-2m,llama-20m [--steps 3] [--batch 8]

The second form measures the Llama flavours' train step in a tab (wasm, WebGPU where there
is a GPU) against native onnxruntime, and which flavours a tab can train: bench/browser_llama.py.

1. Cold starts (issue 23), twice: Chromium is launched first; then the real server (`python
   -m server`, run defaults, quorum 1) starts on a NEW data dir, and a new tab (its own
   browser context) opens `/?backend=wasm` the moment the server prints its URL.
   server_start_to_url_s runs from the spawn to the printed URL; cold_url_to_first_accepted_s
   from the printed URL until the tab's first update is acknowledged "accepted" (Pyodide,
   identity, graphs, shard, H inner steps, encode, sign, submit). The first start has an
   EMPTY ONNX graph cache ($DAA_ONNX_CACHE a new folder: the server exports before its URL),
   the second the cache the first one filled (no export). The top-level figures are the
   warm-cache start's; `cold_starts` has both. Each tab also records its main-thread long
   tasks (PerformanceObserver 'longtask') until the first accepted update.
   open_to_first_accepted_update_s is the warm start's clock from `page.goto`.
3. /static/node/bench.html runs the train step (forward + backward + clip + AdamW, one graph)
   in the tab's Web Worker on the first `batch` rows of the training set, from the latest
   params; native onnxruntime runs the same graph on the same inputs, and torch the same step
   (native_node.trainer's math); medians over `steps` after warm-up.
4. With --enable-unsafe-webgpu, the same step on the WebGPU execution provider (SwiftShader
   here: correctness, not speed); parity = the larger of the relative errors of its loss and
   of its gradient (read from the step's new first moment) against native onnxruntime.

Prints a table and, last, JSON: server_start_to_url_s, cold_url_to_first_accepted_s,
onnx_exported_at_start, cold_starts {empty_cache, warm_cache},
open_to_first_accepted_update_s, wasm_step_ms, native_ort_step_ms, torch_step_ms,
wasm_over_native, webgpu_parity_rel_err (+ details).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import children, emit, free_port, get_json, poll, print_table
from bench.scratch import scratch

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def fetch(url: str, timeout: float = 600) -> tuple[bytes, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read(), resp.headers


def first_rows(base: str, batch: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Rows 0..batch-1 of the training set, as the bench page's worker takes them."""
    from server.browser_data import parse_body

    meta, xb, yb = parse_body(fetch(f"{base}/data/shard?shard=0&n_shards=1")[0])
    x = np.frombuffer(xb, dtype="<i4" if meta["x_dtype"] == "int32" else "<f4")
    y = np.frombuffer(yb, dtype="<i4").astype(np.int64)
    x = x.reshape(meta["rows"], meta["x_cols"])[:batch]
    y = y.reshape(meta["rows"], meta["y_cols"])[:batch]
    if meta["task"] == "lm":
        return x.astype(np.int64), y, meta
    return x.astype(np.float32), y[:, 0], meta


def native_ort(graph: Path, theta: np.ndarray, x: np.ndarray, y: np.ndarray, steps: int
               ) -> tuple[list[float], float, np.ndarray, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    zeros = np.zeros_like(theta)
    feeds = {"params": theta, "exp_avg": zeros, "exp_avg_sq": zeros,
             "lr": np.array(1e-3, dtype=np.float32), "step": np.array(1.0, dtype=np.float32),
             "x": x, "y": y}
    times = []
    out = None
    for i in range(steps + 2):
        t0 = time.perf_counter()
        out = sess.run(["loss", "new_params", "new_exp_avg"], feeds)
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1000)
    assert out is not None
    return times, float(out[0]), np.asarray(out[1]), np.asarray(out[2])


def torch_steps(run: dict[str, Any], theta: np.ndarray, x: np.ndarray, y: np.ndarray,
                steps: int) -> list[float]:
    import torch

    from ml.zoo import build_model, load_flat, loss_fn

    model = build_model(run["model"])
    load_flat(model, theta)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = loss_fn(model(xt), yt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        float(loss.detach())
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1000)
    return times


def bench_page(browser: Any, url: str, timeout_s: float) -> dict[str, Any]:
    page = browser.new_page()
    try:
        page.goto(url)
        page.wait_for_function("() => window.__bench", timeout=timeout_s * 1000, polling=500)
        res = dict(page.evaluate("() => window.__bench"))
    finally:
        page.close()
    if "error" in res:
        raise RuntimeError(f"{url}: {res['error']}")
    return res


LONG_TASKS = """
window.__longTasks = [];
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) window.__longTasks.push([e.startTime, e.duration]);
}).observe({ type: 'longtask', buffered: true });
"""
TAB_FIGURES = """() => {
  const node = window.daaNode;
  const until = node.t0 + node.stats.firstAcceptedMs;
  const paint = performance.getEntriesByName('first-contentful-paint')[0];
  const fcp = paint ? paint.startTime : 0;
  const tasks = window.__longTasks.filter(([start]) => start < until);
  return { stats: node.stats,
    longest_task_after_paint_ms: Math.round(Math.max(0, ...tasks.filter(([s]) => s >= fcp)
      .map(([, d]) => d))),
    total_blocking_ms: Math.round(tasks.reduce((sum, [, d]) => sum + Math.max(0, d - 50), 0)) };
}"""


def cold_start(spawn: Any, browser: Any, tmp: Path, name: str, model: str,
               cache: Path) -> tuple[dict[str, Any], Any, str, dict[str, Any]]:
    """A server on a new data dir with `cache` as its ONNX graph cache, and a tab opened the
    moment it prints its URL -> (figures, the server process, its base URL, the tab's
    stats)."""
    os.environ["DAA_ONNX_CACHE"] = str(cache)
    port = free_port()
    ctx = browser.new_context()
    page = ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.add_init_script(LONG_TASKS)
    log = tmp / f"{name}.log"
    t_spawn = time.monotonic()
    server = spawn(name, "-m", "server", "--data-dir", str(tmp / name), "--port", str(port),
                   "--model", model, "--quorum", "1")
    poll(lambda: server.poll() is None and _printed_url(log), 900,
         f"the server's URL (log in {log})")
    t_url = time.monotonic()
    page.goto(f"http://127.0.0.1:{port}/?backend=wasm")  # the moment the URL is printed
    page.wait_for_function("() => window.daaNode && window.daaNode.stats.accepted >= 1",
                           timeout=300_000, polling=100)
    t_accepted = time.monotonic()
    tab = dict(page.evaluate(TAB_FIGURES))
    ctx.close()  # the tab stops training: the global params stay put from here on
    figures = {"server_start_to_url_s": round(t_url - t_spawn, 2),
               "cold_url_to_first_accepted_s": round(t_accepted - t_url, 2),
               "onnx_exported_at_start": "exporting the model's browser graphs" in
               log.read_text(errors="replace"),
               "longest_task_after_paint_ms": tab["longest_task_after_paint_ms"],
               "total_blocking_ms": tab["total_blocking_ms"], "console_errors": len(errors),
               "tab_timings_ms": {k: round(v) for k, v in tab["stats"]["timings"].items()}}
    return figures, server, f"http://127.0.0.1:{port}", dict(tab["stats"])


def _printed_url(log: Path) -> str | None:
    """The `open http://...` line `python -m server` prints once it serves, or None."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        if line.startswith("open http://"):
            return line.split()[1]
    return None


def rel_err(got: np.ndarray | float, ref: np.ndarray | float) -> float:
    g, r = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    denom = max(float(np.linalg.norm(r)), 1e-30)
    return float(np.linalg.norm(g - r)) / denom


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt-tiny")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed train steps per runtime (20; 3 with --models)")
    ap.add_argument("--batch", type=int, default=None, help="rows per step (32; 8 with --models)")
    ap.add_argument("--no-webgpu", action="store_true")
    ap.add_argument("--models", default=None, help="llama flavours instead of the cold starts, "
                    "e.g. llama-2m,llama-20m (bench/browser_llama.py)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed tab steps (--models)")
    ap.add_argument("--webgpu-software", action="store_true",
                    help="--models: time WebGPU on a software adapter (SwiftShader) too")
    ap.add_argument("--tab-timeout-s", type=float, default=1800, help="per tab run (--models)")
    ap.add_argument("--no-tab-memory", action="store_true",
                    help="--models: skip the tab's memory measurement (Chromium takes ~60 s to "
                         "answer performance.measureUserAgentSpecificMemory)")
    args = ap.parse_args()
    if args.models:
        from bench.browser_llama import run_llama

        args.steps, args.batch = args.steps or 3, args.batch or 8
        run_llama(args)
        return
    args.steps, args.batch = args.steps or 20, args.batch or 32
    from playwright.sync_api import sync_playwright

    tmp = scratch("bench-browser-")
    cache = tmp / "onnx-cache"  # empty for the first start, filled by it for the second
    with children(tmp) as spawn, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        empty, first, _, _ = cold_start(spawn, browser, tmp, "server-empty-cache", args.model,
                                        cache)
        first.terminate()
        first.wait(30)
        warm, _, base, tab = cold_start(spawn, browser, tmp, "server", args.model, cache)
        run = get_json(f"{base}/api/run")
        cfg = run["config"]
        time.sleep(1.0)
        version = fetch(f"{base}/model/params.bin")[1]["X-Round-Version"]
        wasm = bench_page(browser, f"{base}/static/node/bench.html?backend=wasm"
                          f"&steps={args.steps}&batch={args.batch}", 300)
        gpu = None
        if not args.no_webgpu:
            gb = pw.chromium.launch(executable_path=CHROMIUM,
                                    args=[*ARGS, "--enable-unsafe-webgpu"])
            try:
                gpu = bench_page(gb, f"{base}/static/node/bench.html?backend=webgpu"
                                 f"&steps=1&batch={args.batch}", 600)
            finally:
                gb.close()
        browser.close()
        raw, headers = fetch(f"{base}/model/params.bin")
        if headers["X-Round-Version"] != version:
            raise RuntimeError("the global params moved during the step benchmark")
        theta = np.frombuffer(raw, dtype="<f4").copy()
        x, y, _meta = first_rows(base, args.batch)
        graphs = tmp / "graphs"
        graphs.mkdir()
        (graphs / "train_step.onnx").write_bytes(fetch(f"{base}/model/onnx/train_step.onnx")[0])
    ort_ms, ort_loss, ort_params, ort_m = native_ort(graphs / "train_step.onnx", theta, x, y,
                                                     args.steps)
    torch_ms = torch_steps(run, theta, x, y, args.steps)

    def parity(res: dict[str, Any]) -> dict[str, float]:
        """Loss and gradient (the first moment after one step from zeros is 0.1 x the
        clipped gradient) against native onnxruntime. The first AdamW update itself,
        lr * g / (|g| + eps), flips sign wherever g is at rounding level: reported, not
        used."""
        upd = np.asarray(res["params"], dtype=np.float32) - theta
        return {"loss": rel_err(res["loss"], ort_loss),
                "grad": rel_err(np.asarray(res["expAvg"], dtype=np.float32), ort_m),
                "update": rel_err(upd, ort_params - theta)}

    med = statistics.median
    wasm_ms, native_ms, t_ms = med(wasm["stepMs"]), med(ort_ms), med(torch_ms)
    wasm_par = parity(wasm)
    gpu_par = parity(gpu) if gpu is not None else None
    rows = [
        {"runtime": f"ORT-web wasm ({wasm['threads']} threads)", "step_ms": wasm_ms,
         "vs_native_ort": wasm_ms / native_ms, "loss_rel_err": wasm_par["loss"],
         "grad_rel_err": wasm_par["grad"], "update_rel_err": wasm_par["update"]},
        {"runtime": "onnxruntime CPU (native)", "step_ms": native_ms, "vs_native_ort": 1.0},
        {"runtime": "torch CPU", "step_ms": t_ms, "vs_native_ort": t_ms / native_ms},
    ]
    if gpu is not None and gpu_par is not None:
        rows.append({"runtime": "ORT-web WebGPU (SwiftShader)", "step_ms": med(gpu["stepMs"]),
                     "vs_native_ort": med(gpu["stepMs"]) / native_ms,
                     "loss_rel_err": gpu_par["loss"], "grad_rel_err": gpu_par["grad"],
                     "update_rel_err": gpu_par["update"]})
    print(f"model {args.model} ({len(theta):,} params), batch {args.batch}, "
          f"H {cfg['inner_steps']} (run default)")
    for what, f in (("empty graph cache", empty), ("warm graph cache", warm)):
        print(f"cold start, new data dir, {what}: server start -> URL "
              f"{f['server_start_to_url_s']:.1f} s ("
              f"{'ONNX export before the URL' if f['onnx_exported_at_start'] else 'no export'}"
              f"), URL -> first accepted update {f['cold_url_to_first_accepted_s']:.1f} s; "
              f"longest main-thread task after first paint {f['longest_task_after_paint_ms']} "
              f"ms, total blocking {f['total_blocking_ms']} ms")
    py_s = tab["timings"].get("python_ms", 0) / 1000
    graphs_s = tab["timings"].get("graphs_ms", 0) / 1000
    model_s = tab["timings"].get("model_ms", 0) / 1000
    errors = empty["console_errors"] + warm["console_errors"]
    print(f"warm start, open -> first accepted update: {warm['cold_url_to_first_accepted_s']:.1f}"
          f" s (Python in its worker {py_s:.1f} s, graphs {graphs_s:.1f} s, shard {model_s:.1f} "
          f"s); console errors: {errors}")
    print_table(rows, ["runtime", "step_ms", "vs_native_ort", "loss_rel_err", "grad_rel_err",
                       "update_rel_err"])
    emit({"server_start_to_url_s": warm["server_start_to_url_s"],
          "cold_url_to_first_accepted_s": warm["cold_url_to_first_accepted_s"],
          "onnx_exported_at_start": warm["onnx_exported_at_start"],
          "cold_starts": {"empty_cache": empty, "warm_cache": warm},
          "open_to_first_accepted_update_s": warm["cold_url_to_first_accepted_s"],
          "wasm_step_ms": round(wasm_ms, 2), "native_ort_step_ms": round(native_ms, 2),
          "torch_step_ms": round(t_ms, 2), "wasm_over_native": round(wasm_ms / native_ms, 3),
          "webgpu_parity_rel_err": (float(f"{max(gpu_par['loss'], gpu_par['grad']):.3g}")
                                    if gpu_par else None),
          "wasm_parity_rel_err": float(f"{max(wasm_par['loss'], wasm_par['grad']):.3g}"),
          "parity": {"wasm": wasm_par, "webgpu": gpu_par},
          "wasm_threads": wasm["threads"], "model": args.model, "batch": args.batch,
          "inner_steps": cfg["inner_steps"], "steps_timed": args.steps,
          "console_errors": errors, "tab_timings_ms": warm["tab_timings_ms"]})


if __name__ == "__main__":
    main()
