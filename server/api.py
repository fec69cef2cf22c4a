"""REST API (JSON) and the model download."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path
from typing import Any

from aiohttp import web

from ml.tokenizer import unpack
from server.browser_assets import ISOLATION
from server.browser_data import onnx_root
from server.keys import COORDINATOR, RUN
from server.ws import LIMITS

log = logging.getLogger("server.api")

routes = web.RouteTableDef()
MAX_JSON_DEPTH = 64


def finite(obj: Any, depth: int = 0) -> Any:
    """`obj` with every non-finite float (NaN, ±Infinity) turned into None: JSON has no such
    numbers and a browser's JSON.parse refuses them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if depth > MAX_JSON_DEPTH:
        raise ValueError("JSON response nested too deeply")
    if isinstance(obj, dict):
        return {k: finite(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v, depth + 1) for v in obj]
    return obj


def strict_dumps(obj: Any) -> str:
    """The API's only JSON encoder: strict (allow_nan=False) after `finite`."""
    return json.dumps(finite(obj), allow_nan=False)


def json_response(data: Any) -> web.Response:
    return web.json_response(data, dumps=strict_dumps)


BROWSER_DIR = Path(__file__).resolve().parent.parent / "browser"


@routes.get("/api/run")
async def get_run(request: web.Request) -> web.Response:
    run, coord = request.app[RUN], request.app[COORDINATOR]
    last = run.last_round
    return json_response({
        "run_id": run.run_id,
        "server_id": run.identity.node_id if run.identity else None,
        "model": run.work.model_config,
        "model_id": run.work.model_id,
        "n_params": run.n_params,
        "data": {k: v for k, v in run.work.data_spec.to_dict().items()
                 if k != "tokenizer_blob"},  # the blob: the run's tokenizer.json
        # the resolved flavour where the config leaves it to the model's default
        "config": {**run.config.to_dict(),
                   "flavour": run.config.flavour or run.work.model_config.get("flavour")},
        "committed_rounds": run.version,
        "params_digest": run.params_digest,
        "entropy_floor": run.entropy_floor,
        "entropy_rate": run.work.dataset.entropy_rate,
        # loss per byte = loss per token / this (ml/tokenizer.py)
        "bytes_per_token": run.work.dataset.bytes_per_token,
        "eval_loss_init": run.eval_loss_init,
        "eval_loss": last["eval_loss"] if last else run.eval_loss_init,
        **coord.status(),
        "limits": request.app[LIMITS].view(),  # rate limits and closes (server/ws.py)
        "dht": coord.dht.view() if coord.dht is not None else None,  # server/dht.py
        # ms from each commit's last taken update to its RoundCommitted sent (server/outbox.py)
        "commit_ms": coord.outbox.commit_ms[-100:],
    })


def _paging(request: web.Request, since_key: str, since_default: int) -> tuple[int, int]:
    """(since, limit) from the query string; 400 when they are not integers."""
    try:
        since = int(request.query.get(since_key, str(since_default)))
        limit = min(10000, max(1, int(request.query.get("limit", "1000"))))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{since_key} and limit must be integers") from None
    return since, limit


@routes.get("/api/tokenizer.json")
async def get_tokenizer(request: web.Request) -> web.Response:
    """The run's BPE tokenizer.json (ml/tokenizer.py), as nodes get it in Welcome; 404 when
    the run has none. X-Tokenizer-Sha256 is the hash in the model config."""
    spec = request.app[RUN].work.data_spec
    if spec.tokenizer_blob is None or spec.tokenizer_sha256 is None:
        raise web.HTTPNotFound(text="this run has no BPE tokenizer")
    return web.Response(text=unpack(spec.tokenizer_blob, spec.tokenizer_sha256),
                        content_type="application/json",
                        headers={"X-Tokenizer-Sha256": spec.tokenizer_sha256})


@routes.get("/api/rounds")
async def get_rounds(request: web.Request) -> web.Response:
    since, limit = _paging(request, "since", -1)
    return json_response(request.app[RUN].store.rounds(since=since, limit=limit))


@routes.get("/api/rejections")
async def get_rejections(request: web.Request) -> web.Response:
    """Refused updates and frames of authenticated nodes: round, node, code, reason, judges."""
    since, limit = _paging(request, "since_id", 0)
    node = request.query.get("node_id") or None
    return json_response(request.app[RUN].store.rejections(since_id=since, limit=limit,
                                                               node_id=node))


@routes.get("/api/rejections/counts")
async def get_rejection_counts(request: web.Request) -> web.Response:
    """Every refusal of authenticated nodes by (node, code), stored as a row or not."""
    node = request.query.get("node_id") or None
    return json_response(request.app[RUN].store.rejection_counts(node))


@routes.get("/api/autotune")
async def get_autotune(request: web.Request) -> web.Response:
    """The autotuner's decisions (server.autotune): per round, the settings, each change with
    its reason, and the measures it was decided from."""
    since, limit = _paging(request, "since", -1)
    return json_response(request.app[RUN].store.autotune_decisions(since=since, limit=limit))


@routes.get("/api/peers")
async def get_peers(request: web.Request) -> web.Response:
    return json_response(request.app[COORDINATOR].peers_view())


@routes.get("/model/latest.safetensors")
async def latest_model(request: web.Request) -> web.FileResponse:
    run = request.app[RUN]
    path = run.store.latest_path()
    return web.FileResponse(path, headers={
        "Content-Disposition": f'attachment; filename="{run.run_id}-{path.name}"',
        "X-Params-SHA256": run.params_digest, "X-Round-Version": str(run.version)})


@routes.get("/model/params.bin")
async def latest_params(request: web.Request) -> web.Response:
    """The latest committed global params as the flat float32 LE vector (the layout of
    /model/onnx/manifest.json), for browser tools that read no safetensors."""
    run = request.app[RUN]
    body = run.params_bytes  # already the float32 LE bytes: no copy per request
    return web.Response(body=body, content_type="application/octet-stream", headers={
        **ISOLATION, "X-Params-SHA256": run.params_digest, "X-Round-Version": str(run.version),
        "Cache-Control": "no-cache"})


ONNX_FILES = {"train_step.onnx": "train_step", "infer.onnx": "infer",
              "manifest.json": "manifest_path"}


@routes.get("/model/onnx/{name}")
async def onnx_graph(request: web.Request) -> web.FileResponse:
    """The run's model as ONNX graphs for browser nodes (ml/onnx_export.py), exported on
    first request unless the start-up export did, cached by the model config's and the
    exporter code's hash (server.browser_data.onnx_root)."""
    name = request.match_info["name"]
    if name not in ONNX_FILES:
        raise web.HTTPNotFound(text=f"no such graph; one of {sorted(ONNX_FILES)}")
    run = request.app[RUN]
    try:
        from ml.onnx_export import export_graphs
    except ImportError as exc:
        raise web.HTTPServiceUnavailable(text=f"ONNX export needs the 'onnx' extra "
                                              f"(pip install 'daa-prime[onnx]'): {exc}") from None
    try:
        graphs = await asyncio.get_running_loop().run_in_executor(
            None, export_graphs, run.work.model_config, onnx_root(run.store.dir))
    except Exception as exc:  # a bring-your-own model that does not export: the tab says why
        log.warning("ONNX export failed: %s: %s", type(exc).__name__, exc)
        raise web.HTTPUnprocessableEntity(text=json.dumps({
            "reason": "export_failed", "detail": f"{type(exc).__name__}: {exc}"[:2000]}),
            content_type="application/json") from None
    missing = graphs.manifest.get("train_unavailable")
    if name == "train_step.onnx" and missing:  # the manifest says why (docs/byo_model.md)
        raise web.HTTPConflict(text=json.dumps(missing), content_type="application/json")
    return web.FileResponse(getattr(graphs, ONNX_FILES[name]), headers={
        "X-Model-Id": run.work.model_id, "X-Graph-Key": graphs.key,
        "Cache-Control": "public, max-age=3600"})


@routes.get("/")
async def index(request: web.Request) -> web.FileResponse:
    # cross-origin isolated (COOP/COEP): the tab's trainer uses wasm threads
    return web.FileResponse(BROWSER_DIR / "index.html",
                            headers={**ISOLATION, "Cache-Control": "no-cache"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of the run's counters and gauges."""
    run, coord = request.app[RUN], request.app[COORDINATOR]
    status = coord.status()
    last = run.last_round
    lines = [
        "# HELP daa_rounds_committed Outer rounds committed.",
        "# TYPE daa_rounds_committed counter",
        f"daa_rounds_committed {run.version}",
        "# HELP daa_eval_loss Eval loss of the latest global params (nats).",
        "# TYPE daa_eval_loss gauge",
    ]
    loss = last["eval_loss"] if last else run.eval_loss_init
    if loss is not None and math.isfinite(loss):
        lines.append(f"daa_eval_loss {loss}")
    if run.entropy_floor is not None:
        lines += ["# HELP daa_entropy_floor Lowest loss the data allows (nats).",
                  "# TYPE daa_entropy_floor gauge", f"daa_entropy_floor {run.entropy_floor}"]
    lines += [
        "# HELP daa_peers_connected Connected trainers (the nodes a round waits for).",
        "# TYPE daa_peers_connected gauge", f"daa_peers_connected {status['peers_connected']}",
        "# HELP daa_round_attempt Attempt of the open round (0: first; retried below quorum).",
        "# TYPE daa_round_attempt gauge", f"daa_round_attempt {status['attempt']}",
        "# HELP daa_updates_accepted Updates accepted into rounds.",
        "# TYPE daa_updates_accepted counter", f"daa_updates_accepted {status['accepted']}",
        "# HELP daa_updates_duplicate Updates received again (same key), counted once.",
        "# TYPE daa_updates_duplicate counter", f"daa_updates_duplicate {status['duplicates']}",
        "# HELP daa_round_retries Round attempts that closed below quorum and were retried.",
        "# TYPE daa_round_retries counter", f"daa_round_retries {status['retries']}",
        "# HELP daa_bytes_total Bytes on the control and data channels, by direction.",
        "# TYPE daa_bytes_total counter",
        f'daa_bytes_total{{direction="up"}} {status["bytes_up"]}',
        f'daa_bytes_total{{direction="down"}} {status["bytes_down"]}',
        "# HELP daa_rejected_total Frames refused, by error code.",
        "# TYPE daa_rejected_total counter",
    ]
    lines += [f'daa_rejected_total{{code="{code}"}} {n}'
              for code, n in sorted(status["rejected"].items())]
    lines += ["# HELP daa_p2p_total p2p reduction events (transport p2p).",
              "# TYPE daa_p2p_total counter"]
    lines += [f'daa_p2p_total{{event="{event}"}} {n}' for event, n in status["p2p"].items()]
    dp = status["dp"]
    if dp["enabled"]:  # client-level DP (server.dp_accountant)
        lines += ["# HELP daa_dp_steps Sampled Gaussian mechanisms accounted (rounds, redraws).",
                  "# TYPE daa_dp_steps counter", f"daa_dp_steps {dp['steps']}",
                  "# HELP daa_dp_epsilon Epsilon spent so far at daa_dp_delta, by accountant.",
                  "# TYPE daa_dp_epsilon gauge"]
        for name, key in (("rdp", "epsilon"), ("pld", "epsilon_pld")):
            if dp[key] is not None and math.isfinite(dp[key]):
                lines.append(f'daa_dp_epsilon{{accountant="{name}"}} {dp[key]}')
        lines += ["# HELP daa_dp_delta The delta epsilon is reported at.",
                  "# TYPE daa_dp_delta gauge", f"daa_dp_delta {dp['delta']}"]
    return web.Response(text="\n".join(lines) + "\n",
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})
