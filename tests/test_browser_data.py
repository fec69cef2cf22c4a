"""GET /data/shard: a browser tab's shard of the run's training set, the same rows a native
node computes for that shard (ml.data.shard_indices), as raw little-endian arrays."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from aiohttp.test_utils import TestClient, TestServer

from ml.data import shard_indices
from ml.workload import Workload
from server.app import make_app
from server.browser_assets import ISOLATION
from server.browser_data import parse_body
from server.runstate import open_run

Shard = tuple[dict[str, Any], npt.NDArray[Any], npt.NDArray[Any]]


@asynccontextmanager
async def serve(tmp_path: Path, model: str) -> AsyncIterator[tuple[TestClient[Any, Any],
                                                                       Workload]]:
    run = open_run(tmp_path / "run", {"model": model})
    async with TestClient(TestServer(make_app(run))) as client:
        yield client, run.work


async def fetch(client: TestClient[Any, Any], shard: int, n_shards: int) -> tuple[Shard, bytes]:
    """One shard: (meta, x, y) as the browser reads them, and the raw body."""
    resp = await client.get(f"/data/shard?shard={shard}&n_shards={n_shards}")
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/octet-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    for name, value in ISOLATION.items():  # a cross-origin-isolated tab may fetch it
        assert resp.headers[name] == value
    raw = await resp.read()
    meta, xb, yb = parse_body(raw)
    body = xb + yb
    rows, split = meta["rows"], meta["x_bytes"]
    assert (meta["shard"], meta["n_shards"]) == (shard, n_shards)
    x = np.frombuffer(body[:split], dtype="<f4" if meta["x_dtype"] == "float32" else "<i4")
    y = np.frombuffer(body[split:], dtype="<i4")
    assert x.size == rows * meta["x_cols"]
    assert y.size == rows * meta["y_cols"]
    return (meta, x.reshape(rows, meta["x_cols"]), y.reshape(rows, meta["y_cols"])), body


def native_rows(work: Workload, shard: int, n_shards: int) -> npt.NDArray[np.int64]:
    spec = work.data_spec
    return shard_indices(work.dataset.keys_train, n_shards=n_shards, shard=shard,
                         partition=spec.partition, alpha=spec.alpha, seed=spec.seed)


def row_bytes(x: npt.NDArray[Any], y: npt.NDArray[Any]) -> list[bytes]:
    """Each (x, y) row as bytes, sorted: a multiset of rows."""
    return sorted(xr.tobytes() + yr.tobytes() for xr, yr in zip(x, y, strict=True))


async def test_digits_shards_are_the_native_split_and_cover_the_training_set(
        tmp_path: Path) -> None:
    async with serve(tmp_path, "mlp-digits") as (client, work):
        ds = work.dataset
        shards = []
        for i in range(3):
            (meta, x, y), body = await fetch(client, i, 3)
            idx = native_rows(work, i, 3)
            assert meta["task"] == "classify"
            assert meta["x_dtype"] == "float32"
            assert (meta["rows"], meta["x_cols"], meta["y_cols"]) == (len(idx), 64, 1)
            assert "vocab" not in meta
            assert body == (ds.x_train[idx].astype("<f4").tobytes()
                            + ds.y_train[idx].astype("<i4").tobytes())
            shards.append((x, y))
        assert sum(len(x) for x, _ in shards) == len(ds.x_train)
        got = row_bytes(np.concatenate([x for x, _ in shards]),
                        np.concatenate([y for _, y in shards]))
        want = row_bytes(ds.x_train.astype("<f4"), ds.y_train.astype("<i4").reshape(-1, 1))
        assert got == want  # disjoint, and together exactly the training set


async def test_lm_shard_is_token_windows_with_the_vocabulary(tmp_path: Path) -> None:
    async with serve(tmp_path, "gpt-tiny") as (client, work):
        ds, context = work.dataset, work.model_config["context"]
        (meta, x, y), _ = await fetch(client, 2, 4)
        idx = native_rows(work, 2, 4)
        assert meta["task"] == "lm"
        assert meta["x_dtype"] == "int32"
        assert (meta["rows"], meta["x_cols"], meta["y_cols"]) == (len(idx), context, context)
        np.testing.assert_array_equal(x, ds.x_train[idx])
        np.testing.assert_array_equal(y, ds.y_train[idx])
        np.testing.assert_array_equal(y[:, :-1], x[:, 1:])  # next-token targets
        assert len(meta["vocab"]) == work.model_config["vocab_size"]
        assert meta["vocab"] == ds.vocab
        assert ds.entropy_floor is not None
        assert meta["entropy_floor"] == ds.entropy_floor


async def test_bad_arguments_are_refused_naming_the_argument(tmp_path: Path) -> None:
    cases = [
        ("", "n_shards"),
        ("shard=0", "n_shards"),
        ("n_shards=3", "shard"),
        ("shard=x&n_shards=3", "shard"),
        ("shard=0&n_shards=three", "n_shards"),
        ("shard=0&n_shards=1.5", "n_shards"),
        ("shard=3&n_shards=3", "shard"),
        ("shard=-1&n_shards=3", "shard"),
        ("shard=0&n_shards=0", "n_shards"),
        ("shard=0&n_shards=100000", "n_shards"),  # more shards than training rows
    ]
    async with serve(tmp_path, "mlp-digits") as (client, _):
        for query, arg in cases:
            resp = await client.get(f"/data/shard?{query}")
            text = await resp.text()
            assert resp.status == 400, (query, resp.status, text)
            assert text.startswith(f"{arg}:"), (query, text)


async def test_validation_rows_are_the_native_validators_tail(tmp_path: Path) -> None:
    async with serve(tmp_path, "mlp-digits") as (client, work):
        resp = await client.get("/data/val?samples=100")
        assert resp.status == 200
        meta, xb, yb = parse_body(await resp.read())
        body = xb + yb
        ds = work.dataset
        assert (meta["rows"], meta["split"], meta["side"]) == (100, "val", "tail")
        assert body == (np.asarray(ds.x_val)[-100:].astype("<f4").tobytes()
                        + np.asarray(ds.y_val)[-100:].astype("<i4").tobytes())
        big = await client.get(f"/data/val?samples={len(ds.y_val) + 50}")  # capped at the split
        assert parse_body(await big.read())[0]["rows"] == len(ds.y_val)
        assert (await client.get("/data/val?samples=0")).status == 400
