"""bench.browser --models llama-2m,llama-20m: the Llama flavours' train step in a tab.

For each flavour named (`llama-<flavour>`, flavours of ml/llama.py), the real server (`python
-m server --model llama --flavour F`, run defaults: the Markov data at the flavour's context)
starts on a new data dir with the per-user ONNX graph cache (ml.onnx_export's
default_cache_root: the export happens once per flavour and code version, before the server
prints its URL). Then, on the first `batch` rows of the training set (sequence length = the
run's context) and round 0's params:

- the tab: /static/node/bench.html with `backend=wasm` runs the train step (forward + backward
  + clip + AdamW, one graph) in its Web Worker, `warmup` untimed steps then `steps` timed ones,
  and reports its memory after them (performance.measureUserAgentSpecificMemory: the page
  and its workers, the wasm heap included; `worker_mb` is the trainer worker's share; the
  browser answers it about 60 s later here, with or without --enable-blink-features=
  ForceEagerMeasureMemory);
- WebGPU: a second Chromium with --enable-unsafe-webgpu asks navigator.gpu for an adapter.
  No adapter, or only a software one (SwiftShader: CPU emulation, its step times say nothing
  about a GPU), and the row says `unavailable here: <what the browser said>`; with a real
  adapter (or --webgpu-software) the same page runs the step with backend=webgpu;
- native onnxruntime (CPU) runs the same graph file on the same inputs; parity = relative
  error of the tab's loss and first moment (0.1 x the clipped gradient) against it, on every
  K-th entry for large models (bench.js `every`).

"tab can train" applies the tab's own rule (browser/node/node.js trainUnavailable, evaluated
in Chromium on the manifest the server serves, or on the parameter count alone for a flavour
not run: docs/byo_model.md, 7 float32 copies of the parameters over 2 GiB = too_large) to
every flavour of the zoo. A flavour the rule refuses is not started (no server, no export)
and its row says so.

Prints the step table, the can-train table and, last, JSON: {models: [...], can_train: {...},
batch, steps_timed, warmup}.
"""

from __future__ import annotations

import math
import mimetypes
import statistics
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from bench.common import get_json, poll, print_table
from bench.scratch import scratch

ROOT = Path(__file__).resolve().parent.parent
RULE_ORIGIN = "http://127.0.0.1:9"  # never contacted: Playwright serves it (rule_page)
PARITY_ENTRIES = 250_000  # at most this many entries of params / moments come back per tab


def parse_models(spec: str) -> list[str]:
    """`llama-2m,llama-20m` -> ['2m', '20m'] (flavours of ml.llama.LLAMA_FLAVOURS)."""
    from ml.llama import LLAMA_FLAVOURS

    out = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        model, _, flavour = name.partition("-")
        if model != "llama" or flavour not in LLAMA_FLAVOURS:
            known = ", ".join(f"llama-{f}" for f in LLAMA_FLAVOURS)
            raise ValueError(f"--models: {name!r} is not a llama flavour; known: {known}")
        out.append(flavour)
    return out


def flavour_params(flavour: str) -> int:
    """Parameters of a llama flavour at the run's default data (Markov, its vocabulary)."""
    from ml.data import DataSpec
    from ml.llama import LLAMA_FLAVOURS, llama_param_count

    vocab = DataSpec.__dataclass_fields__["vocab_size"].default
    return llama_param_count({**LLAMA_FLAVOURS[flavour], "vocab_size": vocab})


def rule_page(browser: Any) -> Any:
    """A page whose origin serves browser/node and browser/vendor from this checkout, to run
    the tab's own modules without a server."""
    folders = {"/static/node/": ROOT / "browser" / "node",
               "/static/vendor/": ROOT / "browser" / "vendor"}

    def serve(route: Any) -> None:
        path = urlparse(route.request.url).path
        for prefix, folder in folders.items():
            f = (folder / path[len(prefix):]).resolve()
            if path.startswith(prefix) and f.is_relative_to(folder) and f.is_file():
                ctype = "text/javascript" if f.suffix in (".js", ".mjs") else (
                    mimetypes.guess_type(f.name)[0] or "application/octet-stream")
                route.fulfill(status=200, body=f.read_bytes(), content_type=ctype)
                return
        route.fulfill(status=200, content_type="text/html", body=f"<!doctype html>{imports}")

    index = (ROOT / "browser" / "index.html").read_text()  # the tab's import map, as it is
    start = index.index('<script type="importmap">')
    imports = index[start:index.index("</script>", start) + len("</script>")]

    page = browser.new_page()
    page.route(f"{RULE_ORIGIN}/**", serve)
    page.goto(f"{RULE_ORIGIN}/")
    return page


def tab_refusals(page: Any, manifests: list[dict[str, Any]]) -> list[dict[str, str] | None]:
    """browser/node/node.js trainUnavailable(manifest) for each manifest: null = trains."""
    return list(page.evaluate("""async (ms) => {
        const m = await import('/static/node/node.js');
        return ms.map((x) => m.trainUnavailable(x)); }""", manifests))


def webgpu_adapter(browser: Any, url: str) -> dict[str, Any]:
    """What navigator.gpu gives a page at `url`: {ok, software, reason, info}."""
    page = browser.new_page()
    try:
        page.goto(url)
        res: dict[str, Any] = page.evaluate("""async () => {
          if (!navigator.gpu) return { ok: false, reason: 'navigator.gpu is undefined' };
          let a = null;
          try { a = await navigator.gpu.requestAdapter(); } catch (e) {
            return { ok: false, reason: `requestAdapter() threw: ${e.message || e}` }; }
          if (!a) return { ok: false, reason: 'navigator.gpu.requestAdapter() returned null' };
          const i = a.info || {};
          const info = { vendor: i.vendor, architecture: i.architecture, device: i.device,
            description: i.description };
          const fallback = Boolean(a.isFallbackAdapter || i.isFallbackAdapter);
          const named = Object.values(info).join(' ');
          const software = fallback || /swiftshader|llvmpipe|software/i.test(named);
          return { ok: true, software, info, reason: software ? 'only a software adapter ' +
            `(${Object.values(info).filter(Boolean).join(', ') || 'fallback'}): no GPU` : '' };
        }""")
    finally:
        page.close()
    return res


def tab_bench(browser: Any, base: str, backend: str, steps: int, batch: int, warmup: int,
              every: int, timeout_s: float, memory: bool = True) -> dict[str, Any]:
    from bench.browser import bench_page  # bench.browser hands --models to this module

    return bench_page(browser, f"{base}/static/node/bench.html?backend={backend}&steps={steps}"
                      f"&batch={batch}&warmup={warmup}&every={every}&memory={int(memory)}",
                      timeout_s)


def _printed_url(log: Path) -> str | None:
    text = log.read_text(errors="replace") if log.exists() else ""
    return next((ln.split()[1] for ln in text.splitlines() if ln.startswith("open http://")),
                None)


def measure(spawn: Any, browser: Any, gpu_browser: Any, tmp: Path, flavour: str,
            args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """One flavour on its own server: (its row, the manifest the server serves)."""
    from bench.browser import fetch, first_rows, native_ort, rel_err
    from bench.common import free_port

    port, name = free_port(), f"server-llama-{flavour}"
    t0 = time.monotonic()
    server = spawn(name, "-m", "server", "--data-dir", str(tmp / f"run-{flavour}"), "--port",
                   str(port), "--model", "llama", "--flavour", flavour, "--quorum", "1")
    log = tmp / f"{name}.log"
    poll(lambda: server.poll() is None and _printed_url(log), 3600, f"the URL in {log}")
    start_s = time.monotonic() - t0
    base = f"http://127.0.0.1:{port}"
    run, manifest = get_json(f"{base}/api/run"), get_json(f"{base}/model/onnx/manifest.json")
    n = int(run["n_params"])
    every = max(1, math.ceil(n / PARITY_ENTRIES))
    version = fetch(f"{base}/model/params.bin")[1]["X-Round-Version"]
    t_tab = time.monotonic()
    try:  # a tab that fails (out of memory, ...) is a finding: its row says so
        wasm: dict[str, Any] | None = tab_bench(browser, base, "wasm", args.steps, args.batch,
                                                args.warmup, every, args.tab_timeout_s,
                                                memory=not args.no_tab_memory)
        wasm_error = None
    except Exception as exc:  # Playwright's errors and the page's, kept as text
        wasm, wasm_error = None, f"{type(exc).__name__}: {exc}"[:500]
    t_probe = time.monotonic()
    adapter = webgpu_adapter(gpu_browser, f"{base}/api/run")
    t_probed = time.monotonic()
    gpu = None
    if adapter["ok"] and (not adapter["software"] or args.webgpu_software):
        gpu = tab_bench(gpu_browser, base, "webgpu", args.steps, args.batch, 1, every,
                        args.tab_timeout_s)
    raw, headers = fetch(f"{base}/model/params.bin")
    if headers["X-Round-Version"] != version:
        raise RuntimeError("the global params moved during the step benchmark")
    theta = np.frombuffer(raw, dtype="<f4").copy()
    x, y, _meta = first_rows(base, args.batch)
    graph = tmp / f"train_step-{flavour}.onnx"
    graph.write_bytes(fetch(f"{base}/model/onnx/train_step.onnx")[0])
    server.terminate()
    server.wait(30)
    ort_ms, ort_loss, _params, ort_m = native_ort(graph, theta, x, y, args.steps)
    graph.unlink()
    native = statistics.median(ort_ms)
    wall = {"tab_s": round(t_probe - t_tab, 1), "webgpu_probe_s": round(t_probed - t_probe, 1),
            "webgpu_and_native_s": round(time.monotonic() - t_probed, 1)}

    def tab_row(res: dict[str, Any]) -> dict[str, Any]:
        ms = statistics.median(res["stepMs"])
        mem = res.get("memory") or {}
        return {"step_ms": round(ms, 1), "step_ms_all": [round(t, 1) for t in res["stepMs"]],
                "over_native": round(ms / native, 2), "load_s": round(res["loadMs"] / 1000, 1),
                "threads": res["threads"],
                "loss_rel_err": float(f"{rel_err(res['loss'], ort_loss):.3g}"),
                "grad_rel_err": float(f"{rel_err(np.asarray(res['expAvg']), ort_m[::every]):.3g}"),
                "tab_mb": round(mem["bytes"] / 2**20, 1) if "bytes" in mem else None,
                "worker_mb": round(mem["workerBytes"] / 2**20, 1) if "bytes" in mem else None,
                "memory_error": mem.get("error")}

    gpu_row: dict[str, Any] | str
    if gpu is not None:
        gpu_row = tab_row(gpu)
    else:
        gpu_row = "unavailable here: " + (adapter["reason"] + " (--webgpu-software times it)"
                                          if adapter["ok"] else adapter["reason"])
    row = {"model": f"llama-{flavour}", "params": n, "seq": int(x.shape[1]),
           "batch": args.batch, "server_start_s": round(start_s, 1),
           "graph_mb": round(manifest["graphs"]["train_step"]["bytes"] / 2**20, 1)
           if "train_step" in manifest["graphs"] else None,
           "native_ort_step_ms": round(native, 1),
           "wasm": tab_row(wasm) if wasm is not None else {"error": wasm_error}, "webgpu": gpu_row,
           "webgpu_adapter": adapter.get("info"), "wall": wall}
    return row, manifest


def run_llama(args: Any) -> None:
    """The --models mode of bench.browser (module docstring)."""
    from playwright.sync_api import sync_playwright

    from bench.browser import ARGS, CHROMIUM
    from bench.common import children, emit
    from ml.llama import LLAMA_FLAVOURS

    flavours = parse_models(args.models)
    sizes = {f: flavour_params(f) for f in LLAMA_FLAVOURS}
    tmp = scratch("bench-browser-llama-")
    rows: list[dict[str, Any]] = []
    manifests: dict[str, dict[str, Any]] = {}
    with children(tmp) as spawn, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        gpu_browser = pw.chromium.launch(executable_path=CHROMIUM,
                                         args=[*ARGS, "--enable-unsafe-webgpu"])
        rules = rule_page(browser)
        by_size = dict(zip(LLAMA_FLAVOURS, tab_refusals(
            rules, [{"n_params": sizes[f]} for f in LLAMA_FLAVOURS]), strict=True))
        for flavour in flavours:
            if by_size[flavour] is not None:  # the tab would refuse it: not started
                print(f"llama-{flavour}: not run, the tab refuses it ({by_size[flavour]})",
                      flush=True)
                continue
            row, manifests[flavour] = measure(spawn, browser, gpu_browser, tmp, flavour, args)
            rows.append(row)
            print(f"llama-{flavour}: done ({row['wasm']['step_ms']} ms wasm, "
                  f"{row['native_ort_step_ms']} ms native)", flush=True)
        served = tab_refusals(rules, [manifests[f] for f in manifests])
        gpu_browser.close()
        browser.close()
    can_train: dict[str, Any] = {}
    for f in LLAMA_FLAVOURS:
        refusal = dict(zip(manifests, served, strict=True)).get(f, by_size[f])
        can_train[f"llama-{f}"] = {
            "params": sizes[f], "can_train": refusal is None,
            "reason": None if refusal is None else f"{refusal['reason']}: {refusal['detail']}",
            "decided_on": "the served manifest (exported, run in a tab here)" if f in manifests
            else "the parameter count (not exported or run here)"}
    for row in rows:
        row["tab_can_train"] = can_train[row["model"]]["can_train"]
    fig = {"models": rows, "can_train": can_train, "batch": args.batch,
           "steps_timed": args.steps, "warmup": args.warmup}
    report(fig)
    emit(fig)


def report(fig: dict[str, Any]) -> None:
    """The tables of a run's figures (its JSON line)."""
    rows, can_train = fig["models"], fig["can_train"]
    print(f"llama flavours, batch {fig['batch']} x the run's context, {fig['steps_timed']} "
          f"timed steps after {fig['warmup']} warm-up (medians; 2 shared cores, loaded by "
          "other work)")

    def g(v: Any, fmt: str) -> str:
        return "" if v is None else v if isinstance(v, str) else format(v, fmt)

    print_table([{"model": r["model"], "params": f"{r['params']:,}", "seq": r["seq"],
                  "wasm_ms": g(r["wasm"].get("step_ms", "failed"), ".1f"),
                  "native_ort_ms": g(r["native_ort_step_ms"], ".1f"),
                  "wasm/native": g(r["wasm"].get("over_native"), ".2f"),
                  "webgpu_ms": g(r["webgpu"]["step_ms"], ".1f") if isinstance(r["webgpu"], dict)
                  else "unavailable", "tab_mb": g(r["wasm"].get("tab_mb"), ".1f"),
                  "worker_mb": g(r["wasm"].get("worker_mb"), ".1f"),
                  "loss_rel_err": g(r["wasm"].get("loss_rel_err"), ".2g"),
                  "grad_rel_err": g(r["wasm"].get("grad_rel_err"), ".2g")}
                 for r in rows], ["model", "params", "seq", "wasm_ms", "native_ort_ms",
                                  "wasm/native", "webgpu_ms", "tab_mb", "worker_mb",
                                  "loss_rel_err", "grad_rel_err"])
    for r in rows:
        if "error" in r["wasm"]:
            print(f"{r['model']} wasm: the tab failed: {r['wasm']['error']}")
        if not isinstance(r["webgpu"], dict):
            print(f"{r['model']} webgpu: {r['webgpu']}")
    print_table([{"model": k, "params": f"{v['params']:,}", "tab_can_train": "yes" if v["can_train"]
                  else f"no ({v['reason']})", "decided_on": v["decided_on"]}
                 for k, v in can_train.items()], ["model", "params", "tab_can_train",
                                                  "decided_on"])
