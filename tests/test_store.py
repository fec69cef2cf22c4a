"""Tests for server.store: database rows + safetensors checkpoints, crash-safe commits; every
test that touches the database runs on SQLite and on PostgreSQL (the `db_url` fixture)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import SafetensorError

from server.ckpt_file import atomic_write_parts
from server.sqldb import ClosedError, IntegrityError
from server.store import Store, UpdateRow
from shared.messages import sha256_hex

RUN, MODEL = "run-test", "ab" * 32
N = 16


def params_for(version: int) -> np.ndarray:
    return np.random.default_rng(100 + version).standard_normal(N).astype(np.float32)


def momentum_for(version: int) -> np.ndarray:
    return np.random.default_rng(200 + version).standard_normal(N).astype(np.float32)


def row(node: str, digest: str = "d" * 64, **kw: Any) -> UpdateRow:
    base: dict[str, Any] = {"node_id": node, "digest": digest, "bytes": 4 * N,
                            "train_loss": 1.5, "samples": 32, "compute_s": 0.25}
    return UpdateRow(**{**base, **kw})


def new_store(path: Path, db: str | None) -> Store:
    store = Store(path, db)
    store.create_run(run_id=RUN, config={"rounds": 5, "quorum": 1}, model_id=MODEL,
                     workload={"model": {"kind": "mlp"}, "data": {"name": "markov"}},
                     params=params_for(0), entropy_floor=0.5, eval_loss_init=2.0)
    return store


def commit(store: Store, round_: int, *, updates: list[UpdateRow] | None = None,
           keep: int = 10, params: np.ndarray | None = None) -> Any:
    return store.commit_round(
        round_=round_, ckpt_params=params_for(round_ + 1) if params is None else params,
        momentum=momentum_for(round_ + 1), run_id=RUN, model_id=MODEL, attempts=1,
        eval_loss=1.0 - 0.1 * round_, train_loss=1.2,
        updates=[row("a" * 64), row("b" * 64)] if updates is None else updates,
        bytes_up=1000 + round_, bytes_down=2000 + round_, duration_s=0.5, keep=keep)


@pytest.fixture
def store(tmp_path: Path, db_url: str | None) -> Any:
    s = new_store(tmp_path, db_url)
    yield s
    s.close()


def ckpt_files(store: Store) -> list[str]:
    return sorted(p.name for p in store.ckpt_dir.iterdir())


# -- run + initial checkpoint -----------------------------------------------------------------
def test_create_run_then_load_latest(store: Store) -> None:
    ckpt = store.load_latest()
    assert ckpt.version == 0
    np.testing.assert_array_equal(ckpt.params, params_for(0))
    np.testing.assert_array_equal(ckpt.momentum, np.zeros(N, dtype=np.float32))
    assert ckpt.params.dtype == np.float32
    assert ckpt.params_digest == sha256_hex(params_for(0).astype("<f4").tobytes())
    version, name, digest = store.latest()
    assert (version, name, digest) == (0, "v000000.safetensors", ckpt.params_digest)
    assert store.latest_path() == store.ckpt_dir / "v000000.safetensors"


def test_load_run_and_workload(store: Store) -> None:
    run = store.load_run()
    assert run is not None
    assert run["id"] == RUN
    assert run["config"] == {"rounds": 5, "quorum": 1}
    assert run["model_id"] == MODEL
    assert run["n_params"] == N
    assert run["entropy_floor"] == 0.5
    assert run["eval_loss_init"] == 2.0
    assert store.load_workload() == {"model": {"kind": "mlp"}, "data": {"name": "markov"}}
    store.update_config({"rounds": 9})
    assert store.load_run()["config"] == {"rounds": 9}  # type: ignore[index]


def test_empty_store(tmp_path: Path, db_url: str | None) -> None:
    s = Store(tmp_path, db_url)
    try:
        assert s.load_run() is None
        with pytest.raises(RuntimeError, match="no run"):
            s.latest()
        assert s.rounds() == []
    finally:
        s.close()


# -- commits + resume --------------------------------------------------------------------------
def test_commit_three_rounds_then_resume(tmp_path: Path, db_url: str | None) -> None:
    s = new_store(tmp_path, db_url)
    for r in range(3):
        ckpt = commit(s, r)
        assert ckpt.version == r + 1
        assert s.latest()[0] == r + 1
    s.close()

    fresh = Store(tmp_path, db_url)
    try:
        assert fresh.latest()[0] == 3
        ckpt = fresh.load_latest()
        assert ckpt.version == 3
        np.testing.assert_array_equal(ckpt.params, params_for(3))
        np.testing.assert_array_equal(ckpt.momentum, momentum_for(3))
        assert ckpt.params_digest == sha256_hex(params_for(3).tobytes())
        assert fresh.load_run()["id"] == RUN  # type: ignore[index]
        assert [r["round"] for r in fresh.rounds()] == [0, 1, 2]
    finally:
        fresh.close()


def test_rounds_returns_what_was_committed(store: Store) -> None:
    for r in range(4):
        commit(store, r, updates=[row("a" * 64)] * (1 if r % 2 else 0) + [row("c" * 64)])
    rows = store.rounds()
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    first = rows[0]
    assert set(first) == {"round", "committed_at", "attempts", "n_updates", "eval_loss",
                          "train_loss", "params_digest", "bytes_up", "bytes_down",
                          "duration_s"}
    assert first["attempts"] == 1
    assert [r["n_updates"] for r in rows] == [1, 2, 1, 2]
    assert first["eval_loss"] == pytest.approx(1.0)
    assert first["train_loss"] == pytest.approx(1.2)
    assert first["params_digest"] == sha256_hex(params_for(1).tobytes())
    assert (first["bytes_up"], first["bytes_down"]) == (1000, 2000)
    assert [r["round"] for r in store.rounds(since=1)] == [2, 3]
    assert [r["round"] for r in store.rounds(limit=2)] == [0, 1]
    assert [r["round"] for r in store.rounds(since=0, limit=1)] == [1]


def test_update_keys_returns_what_was_committed(store: Store) -> None:
    commit(store, 0, updates=[row("a" * 64, "1" * 64), row("b" * 64, "2" * 64)])
    commit(store, 1, updates=[row("b" * 64, "3" * 64)])
    assert store.update_keys(0) == {"a" * 64: "1" * 64, "b" * 64: "2" * 64}
    assert store.update_keys(1) == {"b" * 64: "3" * 64}
    assert store.update_keys(2) == {}


def test_optional_losses_may_be_none(store: Store) -> None:
    store.commit_round(round_=0, ckpt_params=params_for(1), momentum=momentum_for(1),
                       run_id=RUN, model_id=MODEL, attempts=3, eval_loss=None,
                       train_loss=None, updates=[row("a" * 64, train_loss=None)],
                       bytes_up=0, bytes_down=0, duration_s=0.0, keep=5)
    (r,) = store.rounds()
    assert r["eval_loss"] is None
    assert r["train_loss"] is None
    assert r["attempts"] == 3


# -- crash safety ------------------------------------------------------------------------------
def test_crash_between_checkpoint_and_transaction(tmp_path: Path, db_url: str | None) -> None:
    s = new_store(tmp_path, db_url)
    commit(s, 0)
    commit(s, 1)
    # crash: the checkpoint of round 2 (version 3) reached the disk, its row never did
    s.write_checkpoint(3, params_for(99), momentum_for(99), run_id=RUN, model_id=MODEL)
    assert (s.ckpt_dir / "v000003.safetensors").exists()
    s.close()

    fresh = Store(tmp_path, db_url)
    try:
        version, name, digest = fresh.latest()
        assert (version, name) == (2, "v000002.safetensors")
        assert digest == sha256_hex(params_for(2).tobytes())
        ckpt = fresh.load_latest()
        assert ckpt.version == 2
        np.testing.assert_array_equal(ckpt.params, params_for(2))
        np.testing.assert_array_equal(ckpt.momentum, momentum_for(2))
        # the round commits again over the orphan, with the params it really has
        again = commit(fresh, 2)
        assert again.version == 3
        np.testing.assert_array_equal(fresh.load_latest().params, params_for(3))
    finally:
        fresh.close()


def test_failing_transaction_leaves_no_round_row(store: Store) -> None:
    commit(store, 0)
    # two update rows with the same (round, node_id) violate the primary key
    with pytest.raises(IntegrityError):
        commit(store, 1, updates=[row("a" * 64), row("a" * 64)])
    assert [r["round"] for r in store.rounds()] == [0]
    assert store.update_keys(1) == {}
    assert store.latest()[0] == 1
    np.testing.assert_array_equal(store.load_latest().params, params_for(1))
    assert not store.db.in_transaction
    # and the store still works
    commit(store, 1)
    assert store.latest()[0] == 2


def test_duplicate_round_number_is_refused_and_keeps_committed_state(store: Store) -> None:
    commit(store, 0)
    commit(store, 1)
    committed = store.load_latest()
    with pytest.raises(IntegrityError):
        commit(store, 0, params=params_for(77), updates=[row("z" * 64)])
    assert [r["round"] for r in store.rounds()] == [0, 1]
    assert store.update_keys(0) == {"a" * 64: "d" * 64, "b" * 64: "d" * 64}
    assert not store.db.in_transaction
    latest = store.load_latest()
    assert latest.version == committed.version == 2
    np.testing.assert_array_equal(latest.params, committed.params)
    # the refused commit must not have touched the committed checkpoint of round 0
    np.testing.assert_array_equal(store.read_checkpoint("v000001.safetensors").params,
                                  params_for(1))


def test_duplicate_of_latest_round_keeps_load_latest_working(store: Store) -> None:
    commit(store, 0)
    with pytest.raises(IntegrityError):
        commit(store, 0, params=params_for(77))
    ckpt = store.load_latest()  # must still be the committed round-0 result
    np.testing.assert_array_equal(ckpt.params, params_for(1))


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _tensor_offset(path: Path, name: str) -> int:
    """Absolute file offset of tensor `name`'s first data byte in a safetensors file."""
    import json
    import struct

    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    offset: int = 8 + hlen + int(header[name]["data_offsets"][0])
    return offset


def test_corrupt_params_bytes_are_detected(store: Store) -> None:
    commit(store, 0)
    path = store.ckpt_dir / "v000001.safetensors"
    _flip_byte(path, _tensor_offset(path, "params") + 5)
    with pytest.raises(RuntimeError, match="corrupt"):
        store.read_checkpoint("v000001.safetensors")
    with pytest.raises(RuntimeError):
        store.load_latest()


def test_corrupt_checkpoint_header_is_detected(store: Store) -> None:
    commit(store, 0)
    path = store.ckpt_dir / "v000001.safetensors"
    _flip_byte(path, 12)  # inside the JSON header
    with pytest.raises(SafetensorError, match="deserializing header"):
        store.read_checkpoint("v000001.safetensors")


def test_truncated_checkpoint_is_detected(store: Store) -> None:
    commit(store, 0)
    path = store.ckpt_dir / "v000001.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(SafetensorError, match="deserializing header"):
        store.read_checkpoint("v000001.safetensors")


def test_corrupt_momentum_bytes_are_detected(store: Store) -> None:
    # the momentum is checkpointed state too: resuming from a silently corrupted buffer
    # changes every later outer step
    commit(store, 0)
    path = store.ckpt_dir / "v000001.safetensors"
    _flip_byte(path, _tensor_offset(path, "outer_momentum") + 5)
    with pytest.raises(RuntimeError, match="corrupt"):
        store.read_checkpoint("v000001.safetensors")


def test_missing_checkpoint_fails_load(store: Store) -> None:
    commit(store, 0)
    (store.ckpt_dir / "v000001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"v000001\.safetensors"):
        store.load_latest()


def test_checkpoint_swapped_for_another_version_is_refused(store: Store) -> None:
    commit(store, 0)
    commit(store, 1)
    a, b = store.ckpt_dir / "v000001.safetensors", store.ckpt_dir / "v000002.safetensors"
    b.write_bytes(a.read_bytes())
    with pytest.raises(RuntimeError, match="does not match"):
        store.load_latest()


# -- pruning + atomic writes --------------------------------------------------------------------
def test_prune_keeps_newest_and_v0(store: Store) -> None:
    for r in range(6):
        commit(store, r, keep=2)
    assert ckpt_files(store) == ["v000000.safetensors", "v000005.safetensors",
                                 "v000006.safetensors"]
    assert store.load_latest().version == 6
    np.testing.assert_array_equal(store.read_checkpoint("v000000.safetensors").params,
                                  params_for(0))
    commit(store, 6, keep=1)
    assert ckpt_files(store) == ["v000000.safetensors", "v000007.safetensors"]


def test_prune_removes_orphans(store: Store) -> None:
    commit(store, 0)
    store.write_checkpoint(9, params_for(9), momentum_for(9), run_id=RUN, model_id=MODEL)
    commit(store, 1, keep=5)
    assert ckpt_files(store) == ["v000000.safetensors", "v000001.safetensors",
                                 "v000002.safetensors"]


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    atomic_write_parts(target, [b"first"])
    atomic_write_parts(target, [b"second, ", b"longer"])
    assert target.read_bytes() == b"second, longer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_commits_leave_no_temp_files(store: Store) -> None:
    for r in range(3):
        commit(store, r)
    assert all(name.startswith("v") and name.endswith(".safetensors")
               for name in ckpt_files(store))
    assert not [p for p in store.dir.rglob("*") if ".tmp" in p.name]


def test_checkpoint_metadata(store: Store) -> None:
    from safetensors import safe_open

    commit(store, 0)
    with safe_open(str(store.ckpt_dir / "v000001.safetensors"), framework="numpy") as fh:
        meta = fh.metadata()
        assert set(fh.keys()) == {"params", "outer_momentum"}
    assert meta["run_id"] == RUN
    assert meta["model_id"] == MODEL
    assert meta["version"] == "1"
    assert meta["params_sha256"] == sha256_hex(params_for(1).tobytes())


# -- shards ------------------------------------------------------------------------------------
def test_shard_for_is_stable_and_balanced(tmp_path: Path, db_url: str | None) -> None:
    s = new_store(tmp_path, db_url)
    nodes = [f"{i:064x}" for i in range(12)]
    shards = {n: s.shard_for(n, "native", 4) for n in nodes}
    assert Counter(shards.values()) == {0: 3, 1: 3, 2: 3, 3: 3}
    assert [shards[n] for n in nodes[:4]] == [0, 1, 2, 3]  # least used, lowest first
    for n in nodes:  # asking again, whatever the runtime, gives the same shard
        assert s.shard_for(n, "browser", 4) == shards[n]
    s.close()
    fresh = Store(tmp_path, db_url)
    try:
        assert {n: fresh.shard_for(n, "native", 4) for n in nodes} == shards
        extra = fresh.shard_for("f" * 64, "browser", 4)
        assert extra == 0
        assert fresh.shard_for("e" * 64, "browser", 4) == 1
    finally:
        fresh.close()


def test_shard_for_fills_the_least_used(store: Store) -> None:
    assert store.shard_for("a" * 64, "native", 3) == 0
    assert store.shard_for("b" * 64, "native", 3) == 1
    assert store.shard_for("c" * 64, "native", 3) == 2
    assert store.shard_for("d" * 64, "native", 3) == 0
    counts = Counter(store.shard_for(f"{i:064x}", "native", 3) for i in range(100, 130))
    total = Counter({0: 2, 1: 1, 2: 1}) + counts
    assert max(total.values()) - min(total.values()) <= 1


def test_close_waits_for_a_commit_running_in_another_thread(tmp_path: Path,
                                                            db_url: str | None) -> None:
    """The server commits in an executor thread; closing the store at shutdown must not free
    the connection under that commit (it segfaulted in CI before the store's lock)."""
    import threading
    import time

    store = new_store(tmp_path / "run", db_url)
    started = threading.Event()
    order: list[str] = []

    def slow_commit() -> None:
        with store.lock:  # what every Store method holds while it uses the connection
            started.set()
            time.sleep(0.3)  # the behaviour under test: close() comes during a slow commit
            commit(store, 0)
            order.append("committed")

    t = threading.Thread(target=slow_commit)
    t.start()
    assert started.wait(5)
    store.close()
    order.append("closed")
    t.join(5)
    assert order == ["committed", "closed"]  # close() waited for the commit
    with pytest.raises(ClosedError):  # and later use is a clean error
        store.rounds()


# -- the round's ledger entries commit in the round's transaction (both backends) -------------
class FakeBatch:
    def __init__(self, rows: list[tuple[int, str, str, int | None, str, str]]) -> None:
        self.rows, self.blobs = rows, {"e" * 64: b"frame"}


class FakeLedger:
    """server.store.RoundLedger: one entry per round; `dup` makes its insert fail (a seq
    that is already there), `fail` makes building the batch raise."""

    def __init__(self) -> None:
        self.dup = self.fail = False
        self.done_rounds: list[int] = []

    def round_batch(self, round_: int, rows: list[UpdateRow]) -> FakeBatch:
        if self.fail:
            raise RuntimeError("the ledger refused the round")
        seq = 0 if self.dup else round_
        return FakeBatch([(seq, f"{round_:064x}", "reward", round_, "{}", "sig")])

    def done(self, batch: Any) -> None:
        self.done_rounds.append(batch.rows[0][3])


def test_round_row_updates_and_ledger_entries_commit_together(store: Store) -> None:
    ledger = FakeLedger()
    store.round_ledger = ledger
    commit(store, 0)
    assert [r["entry"] for r in store.ledger_records()] == [{}]
    assert store.ledger_blobs() == {"e" * 64: b"frame"}
    for mode in ("dup", "fail"):  # the ledger insert fails / the batch cannot be built
        setattr(ledger, mode, True)
        with pytest.raises(IntegrityError if mode == "dup" else RuntimeError):
            commit(store, 1)
        setattr(ledger, mode, False)
        assert [r["round"] for r in store.rounds()] == [0]  # neither the round row...
        assert store.update_keys(1) == {}  # ...nor its updates...
        assert len(store.ledger_records()) == 1  # ...nor its ledger entries
        assert not store.db.in_transaction
    commit(store, 1)
    assert len(store.ledger_records()) == 2
    assert ledger.done_rounds == [0, 1]


def test_unknown_database_url_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="postgresql://"):
        Store(tmp_path, "mysql://localhost/run")


# -- autotune decisions (server.autotune) ----------------------------------------------------
def test_autotune_decisions_round_trip_and_survive_a_reopen(store: Store, tmp_path: Path,
                                                             db_url: str | None) -> None:
    settings = {"budget_s": 0.45, "max_steps": 29, "deadline_s": 1.06, "quorum": 8,
                "codecs": {"a" * 64: "int8-block"}}
    change = {"setting": "budget_s", "old": "H 10", "new": 0.45, "reason": "H 10 -> 0.45 s"}
    inputs = {"round": 0, "nodes": [{"node_id": "a" * 64, "steps": 10, "bytes_up": 42}]}
    assert store.autotune_decisions() == []
    for r in (1, 2, 3):
        store.record_autotune(round_=r, settings={**settings, "max_steps": 28 + r},
                              changes=[change], inputs=inputs)
    store.record_autotune(round_=3, settings=settings, changes=[], inputs=inputs)  # replaced
    rows = store.autotune_decisions()
    assert [d["round"] for d in rows] == [1, 2, 3]
    assert rows[0]["settings"]["max_steps"] == 29
    assert rows[0]["changes"] == [change]
    assert rows[0]["inputs"] == inputs
    assert rows[2]["changes"] == []
    assert [d["round"] for d in store.autotune_decisions(since=1)] == [2, 3]
    assert [d["round"] for d in store.autotune_decisions(limit=2, newest=True)] == [2, 3]
    assert store.autotune_count() == 3
    store.close()
    again = Store(tmp_path, db_url)
    try:
        assert again.autotune_decisions(limit=1, newest=True)[0]["settings"] == settings
    finally:
        again.close()
