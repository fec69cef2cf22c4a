"""The store and the API hold only what they can: rejection evidence bounded per node and per
round (a sample plus counters), no value the database's INTEGER cannot hold, no non-JSON number."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from server.api import finite, strict_dumps
from server.store import (
    MAX_REJECTION_ROWS_PER_NODE,
    MAX_REJECTION_ROWS_PER_NODE_ROUND,
    Store,
    UpdateRow,
)
from shared.errors import ERROR_CODES


@pytest.fixture
def store(tmp_path: Path, db_url: str | None) -> Iterator[Store]:
    s = Store(tmp_path, db_url)  # on SQLite and PostgreSQL (conftest's db_url)
    s.create_run(run_id="r", config={}, model_id="m" * 64, workload={},
                 params=np.zeros(4, np.float32), entropy_floor=None, eval_loss_init=None)
    yield s
    s.close()


def reject(store: Store, node: str, round_: int | None) -> bool:
    return store.record_rejection(round_=round_, node_id=node, digest=None, code="bad_message",
                                  reason="x" * 10_000, validators=["server"])


def test_rejections_are_bounded_per_round_and_per_node(store: Store) -> None:
    kept = sum(reject(store, "a", 0) for _ in range(1000))
    assert kept == MAX_REJECTION_ROWS_PER_NODE_ROUND
    for r in range(1, 500):  # spread over rounds (an attacker picks the header's round)
        reject(store, "a", r)
    reject(store, "a", 10**30)  # a round no column holds: stored as NULL
    rows = store.rejections(node_id="a", limit=10_000)
    assert len(rows) == MAX_REJECTION_ROWS_PER_NODE
    assert all(len(r["reason"]) <= 512 for r in rows)
    counts = store.rejection_counts("a")
    assert counts == [{"node_id": "a", "code": "bad_message", "n": 1500,
                       "stored": MAX_REJECTION_ROWS_PER_NODE}]
    assert reject(store, "b", 0)  # another node has its own sample
    per_node = store.rejection_rows_per_node()
    assert per_node["a"] <= MAX_REJECTION_ROWS_PER_NODE + len(ERROR_CODES)
    assert per_node["b"] == 2


def test_commit_never_hands_sqlite_what_it_cannot_hold(store: Store) -> None:
    rows = [UpdateRow(node_id="a", digest="d", bytes=4, train_loss=math.inf, samples=10**20,
                      compute_s=math.nan)]
    store.commit_round(round_=0, ckpt_params=np.ones(4, np.float32),
                       momentum=np.zeros(4, np.float32), run_id="r", model_id="m" * 64,
                       attempts=1, eval_loss=math.nan, train_loss=math.inf, updates=rows,
                       bytes_up=1, bytes_down=1, duration_s=1.0, keep=3)
    (rec,) = store.rounds()
    assert rec["eval_loss"] is None
    assert rec["train_loss"] is None
    json.dumps(rec, allow_nan=False)


def test_api_json_is_strict() -> None:
    obj = {"a": [1.0, math.inf, {"b": -math.inf, "c": math.nan}], "d": (2, "x")}
    assert finite(obj) == {"a": [1.0, None, {"b": None, "c": None}], "d": [2, "x"]}
    assert json.loads(strict_dumps(obj)) == finite(obj)
    assert "Infinity" not in strict_dumps(obj)
    assert "NaN" not in strict_dumps(obj)
