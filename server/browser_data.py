"""What a browser tab trains on: its shard of the run's training set, as raw arrays.

    GET /data/shard?shard=I&n_shards=N   the rows of shard I of N (the same split native
                                         nodes compute: ml.data.shard_indices)
    GET /data/val?samples=K              the LAST K rows of the validation split: what a
                                         validator tab scores candidates on (the same rows a
                                         `--role validator` node uses; the server uses the
                                         first ones)

Body: a u32 LE length m, m bytes of JSON metadata, then x and y, little-endian: x float32
(digits) or int32 (token windows), y int32. The metadata says how to read them: task, rows,
x_dtype, x_cols, y_cols, x_bytes, and for language models the vocabulary (one symbol per id;
it can be long, so it is not a header) and the entropy floor. A browser also needs the
vocabulary to turn a local text file into token windows ("train on my own data").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import struct
import sys
from collections.abc import AsyncIterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from ml.data import shard_indices
from ml.workload import Workload
from server.browser_assets import ISOLATION
from server.keys import RUN
from transport.lifetime import orphan_safe

log = logging.getLogger("server.browser_data")
routes = web.RouteTableDef()
MAX_SHARDS = 1 << 20


def _pack(work: Workload, x: np.ndarray, y: np.ndarray, extra: dict[str, object]
          ) -> tuple[bytes, dict[str, object]]:
    ds = work.dataset
    lm = ds.task == "lm"
    xb = (x.astype("<i4") if lm else x.astype("<f4")).tobytes()
    yb = y.astype("<i4").tobytes()
    meta: dict[str, object] = {
        "task": ds.task, "rows": len(x), "x_dtype": "int32" if lm else "float32",
        "x_cols": int(np.prod(x.shape[1:])), "y_cols": int(np.prod(y.shape[1:])) if lm else 1,
        "x_bytes": len(xb), **extra,
    }
    if lm:
        vocab = ds.vocab if ds.vocab is not None else [str(i) for i in range(
            int(work.model_config.get("vocab_size", 0)))]
        meta.update(vocab=vocab, entropy_floor=ds.entropy_floor)
    return xb + yb, meta


def shard_arrays(work: Workload, shard: int, n_shards: int) -> tuple[bytes, dict[str, object]]:
    ds, spec = work.dataset, work.data_spec
    idx = shard_indices(ds.keys_train, n_shards=n_shards, shard=shard, partition=spec.partition,
                        alpha=spec.alpha, seed=spec.seed)
    return _pack(work, ds.x_train[idx], ds.y_train[idx], {"shard": shard, "n_shards": n_shards})


def val_arrays(work: Workload, samples: int) -> tuple[bytes, dict[str, object]]:
    """The last `samples` validation rows (ml.scoring.ProbeScorer, side "tail")."""
    x, y = np.asarray(work.dataset.x_val), np.asarray(work.dataset.y_val)
    k = max(1, min(samples, len(x)))
    return _pack(work, x[len(x) - k:], y[len(y) - k:], {"split": "val", "side": "tail"})


def parse_body(raw: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """The inverse of `_body`: (metadata, x bytes, y bytes) of a /data response."""
    (m,) = struct.unpack_from("<I", raw)
    meta: dict[str, Any] = json.loads(raw[4:4 + m])
    body = raw[4 + m:]
    return meta, body[:meta["x_bytes"]], body[meta["x_bytes"]:]


def _body(arrays: bytes, meta: dict[str, object]) -> bytes:
    head = json.dumps(meta, separators=(",", ":")).encode()
    return struct.pack("<I", len(head)) + head + arrays


@lru_cache(maxsize=64)
def _cached(key: int, shard: int, n_shards: int, work: Workload) -> bytes:
    return _body(*shard_arrays(work, shard, n_shards))


@lru_cache(maxsize=8)
def _cached_val(key: int, samples: int, work: Workload) -> bytes:
    return _body(*val_arrays(work, samples))


def _int_arg(request: web.Request, name: str, low: int, high: int) -> int:
    raw = request.query.get(name)
    ok = raw is not None and raw.isascii() and raw.isdigit() and len(raw) <= 9
    value = int(raw) if ok and raw is not None else None
    if value is None or not low <= value < high:
        raise web.HTTPBadRequest(text=f"{name}: an integer in [{low}, {high}) is required",
                                 headers=ISOLATION)
    return value


@routes.get("/data/shard")
async def get_shard(request: web.Request) -> web.Response:
    work = request.app[RUN].work
    n_shards = _int_arg(request, "n_shards", 1, MAX_SHARDS)
    shard = _int_arg(request, "shard", 0, n_shards)
    if n_shards > len(work.dataset.y_train):
        raise web.HTTPBadRequest(text=f"n_shards: the training set has only "
                                      f"{len(work.dataset.y_train)} rows", headers=ISOLATION)
    body = await asyncio.to_thread(_cached, id(work), shard, n_shards, work)
    return web.Response(body=body, content_type="application/octet-stream",
                        headers={**ISOLATION, "Cache-Control": "no-cache"})


@routes.get("/data/val")
async def get_val(request: web.Request) -> web.Response:
    work = request.app[RUN].work
    samples = _int_arg(request, "samples", 1, 1 << 16)
    body = await asyncio.to_thread(_cached_val, id(work), samples, work)
    return web.Response(body=body, content_type="application/octet-stream",
                        headers={**ISOLATION, "Cache-Control": "no-cache"})


ONNX_READY = web.AppKey("onnx_ready", asyncio.Event)  # set once the graphs are on disk


def onnx_root(data_dir: Path) -> Path:
    """Where the server reads and writes the run's graphs: `<data dir>/onnx` when it exists
    (a resumed run from before the shared cache, the e2e tests' link), else the per-user cache
    that every run shares (ml.onnx_export.default_cache_root), so a new run of a model
    exported before is ready in seconds."""
    local = data_dir / "onnx"
    if local.exists():
        return local
    from ml.onnx_export import default_cache_root

    return default_cache_root()


async def prewarm_onnx(app: web.Application) -> AsyncIterator[None]:
    """A cleanup context: export the run's ONNX graphs in the background at startup, so that
    the first tab to open does not wait for it (ml/onnx_export.py caches them by config and
    code digest). `app[ONNX_READY]` is set when they are on disk (at once on a cache hit:
    then no child starts); `python -m server` waits for it before it prints the URL.

    In a child process (`python -m ml.onnx_export --model-config ...`): the export is tens of
    seconds of Python holding the GIL (gpt-tiny micro), and in a thread it starved the event
    loop, so the aiortc peers of a `star` run missed their ICE consent checks and dropped their
    data channels (bench.transport, 8 nodes). The result lands in the same cache the request
    path reads. A plain child, not a multiprocessing pool: no resource-tracker process, and
    transport.lifetime.orphan_safe makes it die with the server even on `kill -9`; at a clean
    shutdown it is interrupted (it then removes its half-written cache entry)."""
    ready = asyncio.Event()
    app[ONNX_READY] = ready
    try:
        from ml.onnx_export import cached_graphs
    except ImportError:  # the onnx extras are missing: tabs get a 503 that says so
        ready.set()
        yield
        return
    run = app[RUN]
    root = onnx_root(run.store.dir)
    if cached_graphs(run.work.model_config, root) is not None:
        ready.set()
        yield
        return
    argv = [sys.executable, "-m", "ml.onnx_export", "--model-config",
            json.dumps(run.work.model_config), "--out", str(root)]
    proc = await asyncio.create_subprocess_exec(
        *orphan_safe(argv), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    stopping = False

    async def watch() -> None:
        _, err = await proc.communicate()
        ready.set()
        if proc.returncode != 0 and not stopping:
            tail = err.decode(errors="replace").strip().splitlines()[-3:]
            log.warning("ONNX export failed (exit %s); browser nodes cannot train: %s",
                        proc.returncode, " / ".join(tail))

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        if proc.returncode is None:
            stopping = True
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(task, timeout=5)
