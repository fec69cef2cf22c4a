"""The browser node, measured: time from opening the page to a first accepted update, and
the train step in ONNX Runtime Web (wasm) against native onnxruntime and torch on the CPU.

    python -m bench.browser [--model gpt-tiny] [--steps 20] [--batch 32] [--no-webgpu]
                            [--cold-export]

1. Cold start (issue 23): Chromium is launched first; then the real server (`python -m
   server`, run defaults, quorum 1) starts on a NEW data dir, and the tab opens
   `/?backend=wasm` the moment the server prints its URL. server_start_to_url_s runs from
   the spawn to the printed URL (it includes the ONNX export when the per-user graph cache
   has no entry for this model and code: `--cold-export` forces that with an empty cache);
   cold_url_to_first_accepted_s from the printed URL until the tab's first update is
   acknowledged "accepted" (Pyodide, identity, graphs, shard, H inner steps, encode, sign,
   submit). open_to_first_accepted_update_s is the same clock from `page.goto`.
3. /static/node/bench.html runs the train step (forward + backward + clip + AdamW, one graph)
   in the tab's Web Worker on the first `batch` rows of the training set, from the latest
   params; native onnxruntime runs the same graph on the same inputs, and torch the same step
   (native_node.trainer's math); medians over `steps` after warm-up.
4. With --enable-unsafe-webgpu, the same step on the WebGPU execution provider (SwiftShader
   here: correctness, not speed); parity = the larger of the relative errors of its loss and
   of its gradient (read from the step's new first moment) against native onnxruntime.

Prints a table and, last, JSON: server_start_to_url_s, cold_url_to_first_accepted_s,
onnx_exported_at_start, open_to_first_accepted_update_s, wasm_step_ms,
native_ort_step_ms, torch_step_ms, wasm_over_native, webgpu_parity_rel_err (+ details).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import children, emit, free_port, get_json, poll, print_table

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
    ap.add_argument("--steps", type=int, default=20, help="timed train steps per runtime")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-webgpu", action="store_true")
    ap.add_argument("--cold-export", action="store_true",
                    help="an empty ONNX graph cache: the server exports before its URL")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="bench-browser-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    if args.cold_export:
        os.environ["DAA_ONNX_CACHE"] = str(tmp / "onnx-cache")
    with children(tmp) as spawn, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        ctx = browser.new_context()
        page = ctx.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        t_spawn = time.monotonic()
        server = spawn("server", "-m", "server", "--data-dir", str(tmp / "run"), "--port",
                       str(port), "--model", args.model, "--quorum", "1")
        url_line = poll(lambda: server.poll() is None and _printed_url(tmp / "server.log"),
                        900, f"the server's URL (log in {tmp})")
        t_url = time.monotonic()
        page.goto(f"{base}/?backend=wasm")  # the moment the URL is printed
        page.wait_for_function("() => window.daaNode && window.daaNode.stats.accepted >= 1",
                               timeout=300_000, polling=100)
        t_accepted = time.monotonic()
        start_to_url_s, cold_s, open_s = t_url - t_spawn, t_accepted - t_url, t_accepted - t_url
        exported = "exporting the model's browser graphs" in (tmp / "server.log").read_text()
        run = get_json(f"{base}/api/run")
        cfg = run["config"]
        tab = dict(page.evaluate("() => window.daaNode.stats"))
        ctx.close()  # the tab stops training: the global params stay put from here on
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
    print(f"cold start, new data dir: server start -> URL {start_to_url_s:.1f} s "
          f"({'ONNX export before the URL' if exported else 'graphs from the per-user cache'}), "
          f"URL ({url_line}) -> first accepted update {cold_s:.1f} s")
    py_s = tab["timings"].get("python_ms", 0) / 1000
    model_s = tab["timings"].get("model_ms", 0) / 1000
    print(f"open -> first accepted update: {open_s:.1f} s (Python {py_s:.1f} s, model + shard "
          f"{model_s:.1f} s); console errors: {len(errors)}")
    print_table(rows, ["runtime", "step_ms", "vs_native_ort", "loss_rel_err", "grad_rel_err",
                       "update_rel_err"])
    emit({"server_start_to_url_s": round(start_to_url_s, 2),
          "cold_url_to_first_accepted_s": round(cold_s, 2),
          "onnx_exported_at_start": exported,
          "open_to_first_accepted_update_s": round(open_s, 2),
          "wasm_step_ms": round(wasm_ms, 2), "native_ort_step_ms": round(native_ms, 2),
          "torch_step_ms": round(t_ms, 2), "wasm_over_native": round(wasm_ms / native_ms, 3),
          "webgpu_parity_rel_err": (float(f"{max(gpu_par['loss'], gpu_par['grad']):.3g}")
                                    if gpu_par else None),
          "wasm_parity_rel_err": float(f"{max(wasm_par['loss'], wasm_par['grad']):.3g}"),
          "parity": {"wasm": wasm_par, "webgpu": gpu_par},
          "wasm_threads": wasm["threads"], "model": args.model, "batch": args.batch,
          "inner_steps": cfg["inner_steps"], "steps_timed": args.steps,
          "console_errors": len(errors),
          "tab_timings_ms": {k: round(v) for k, v in tab["timings"].items()}})


if __name__ == "__main__":
    main()
