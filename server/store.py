"""Durable run state: rows in SQLite (`--data-dir`/run.sqlite, the default) or PostgreSQL
(`--db postgresql://...`, server.sqldb chooses), safetensors checkpoints under --data-dir.

Commit protocol (crash-safe at any instant):
1. write the checkpoint to a temp file, fsync, rename over `checkpoints/vNNNNNN.safetensors`,
   fsync the directory;
2. ONE database transaction inserts the round row (naming that file), its update rows and its
   ledger entries.
The last committed round is the newest row; a checkpoint file without a row is an orphan from
a crash between 1 and 2 and is simply rewritten when that round commits again.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from safetensors import safe_open

from server.ckpt_file import f32_digest, save_f32
from server.sqldb import IntegrityError, connect
from shared.messages import MAX_INT

# Stored evidence is bounded: a node's refusals are kept as rows (a sample) up to these
# counts, and every refusal, kept or not, is counted in `rejection_counts` (node, code). So a
# node holds at most MAX_REJECTION_ROWS_PER_NODE rejection rows plus one count row per code.
MAX_REJECTION_ROWS_PER_NODE_ROUND = 8
MAX_REJECTION_ROWS_PER_NODE = 64
MAX_REASON_CHARS = 512
INT64 = (-(2**63), 2**63 - 1)


def finite_or_none(x: float | None) -> float | None:
    """A float the store and the JSON API can hold: non-finite values become None (NULL)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def sql_int(x: int) -> int:
    """An integer the store's INTEGER (i64; BIGINT on PostgreSQL) holds: clamped (the
    decoder's ranges keep every wire value far inside; this is the store's own guarantee)."""
    return max(INT64[0], min(INT64[1], int(x)))

SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    id TEXT PRIMARY KEY, config TEXT NOT NULL, created_at REAL NOT NULL,
    model_id TEXT NOT NULL, n_params INTEGER NOT NULL, entropy_floor REAL,
    eval_loss_init REAL, checkpoint TEXT NOT NULL, params_digest TEXT NOT NULL,
    workload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, committed_at REAL NOT NULL, attempts INTEGER NOT NULL,
    n_updates INTEGER NOT NULL, eval_loss REAL, train_loss REAL,
    params_digest TEXT NOT NULL, checkpoint TEXT NOT NULL,
    bytes_up INTEGER NOT NULL, bytes_down INTEGER NOT NULL, duration_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL, node_id TEXT NOT NULL, digest TEXT NOT NULL,
    bytes INTEGER NOT NULL, train_loss REAL, samples INTEGER NOT NULL, compute_s REAL NOT NULL,
    PRIMARY KEY (round, node_id));
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, round INTEGER,
    node_id TEXT NOT NULL, digest TEXT, code TEXT NOT NULL, reason TEXT NOT NULL,
    validators TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS rejections_by_node ON rejections (node_id, round);
CREATE TABLE IF NOT EXISTS rejection_counts (
    node_id TEXT NOT NULL, code TEXT NOT NULL, n INTEGER NOT NULL, stored INTEGER NOT NULL,
    PRIMARY KEY (node_id, code));
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY, shard INTEGER NOT NULL, runtime TEXT NOT NULL,
    first_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY, hash TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, round INTEGER,
    entry TEXT NOT NULL, sig TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_evidence (hash TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS autotune (
    round INTEGER PRIMARY KEY, decided_at REAL NOT NULL, settings TEXT NOT NULL,
    changes TEXT NOT NULL, inputs TEXT NOT NULL);
"""


class LedgerAppend(Protocol):
    """Signed ledger rows to insert in one transaction (server.ledger.LedgerBatch)."""

    rows: list[tuple[int, str, str, int | None, str, str]]  # seq, hash, kind, round, entry, sig
    blobs: dict[str, bytes]  # evidence frames by SHA-256 hex


class RoundLedger(Protocol):
    """What commit_round asks for the round's ledger entries (server.ledger.LedgerBook)."""

    def round_batch(self, round_: int, rows: list[UpdateRow]) -> Any: ...
    def done(self, batch: Any) -> None: ...


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    version: int  # committed rounds so far (0 = initial params)
    params: np.ndarray  # flat float32 global params theta_version
    momentum: np.ndarray  # outer optimizer momentum buffer
    params_digest: str  # sha256 of params' float32 bytes


@dataclass(frozen=True, kw_only=True)
class UpdateRow:
    node_id: str  # sender
    digest: str  # payload digest
    bytes: int  # payload size on the wire
    train_loss: float | None  # node's inner loss
    samples: int  # samples trained on
    compute_s: float  # node's compute seconds


T = TypeVar("T")


def _locked(fn: Callable[..., T]) -> Callable[..., T]:
    """Run a Store method under its lock (see Store.__init__)."""

    @functools.wraps(fn)
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> T:
        with self.lock:
            return fn(self, *args, **kwargs)

    return wrapper


class Store:
    """One run's database (SQLite or PostgreSQL) and checkpoint folder."""

    def __init__(self, data_dir: str | Path, db: str | None = None) -> None:
        self.dir = Path(data_dir)
        self.ckpt_dir = self.dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        # one connection, used from the event loop and from executor threads (commits): every
        # use holds `lock`, so that close() cannot free it under a running statement
        self.lock = threading.RLock()
        self.db_url = db  # None: SQLite in the data dir
        self.db = connect(db, self.dir, SCHEMA)
        # the ledger whose round entries commit_round inserts in the round's transaction
        self.round_ledger: RoundLedger | None = None

    def close(self) -> None:
        with self.lock:  # never under a commit running in an executor thread (a segfault)
            self.db.close()

    # -- run -----------------------------------------------------------------------------
    @_locked
    def load_run(self) -> dict[str, Any] | None:
        row = self.db.execute("SELECT id, config, created_at, model_id, n_params, "
                              "entropy_floor, eval_loss_init FROM run").fetchone()
        if row is None:
            return None
        keys = ("id", "config", "created_at", "model_id", "n_params", "entropy_floor",
                "eval_loss_init")
        out = dict(zip(keys, row, strict=True))
        out["config"] = json.loads(out["config"])
        return out

    @_locked
    def create_run(self, *, run_id: str, config: dict[str, Any], model_id: str,
                   workload: dict[str, Any], params: np.ndarray, entropy_floor: float | None,
                   eval_loss_init: float | None) -> Checkpoint:
        ckpt = self.write_checkpoint(0, params, np.zeros_like(params), run_id=run_id,
                                     model_id=model_id)
        with self.db.transaction():
            self.db.execute("INSERT INTO run VALUES (?,?,?,?,?,?,?,?,?,?)",
                            (run_id, json.dumps(config), time.time(), model_id, len(params),
                             entropy_floor, eval_loss_init, self._name(0), ckpt.params_digest,
                             json.dumps(workload)))
        return ckpt

    @_locked
    def load_workload(self) -> dict[str, Any]:
        """The model config and data spec the run was created with."""
        out: dict[str, Any] = json.loads(self.db.execute("SELECT workload FROM run").fetchone()[0])
        return out

    @_locked
    def update_config(self, config: dict[str, Any]) -> None:
        with self.db.transaction():
            self.db.execute("UPDATE run SET config = ?", (json.dumps(config),))

    # -- checkpoints ---------------------------------------------------------------------
    @staticmethod
    def _name(version: int) -> str:
        return f"v{version:06d}.safetensors"

    def write_checkpoint(self, version: int, params: np.ndarray, momentum: np.ndarray, *,
                         run_id: str, model_id: str) -> Checkpoint:
        params = np.ascontiguousarray(params, dtype=np.float32)
        momentum = np.ascontiguousarray(momentum, dtype=np.float32)
        digest = f32_digest(params)  # hashed and written from the arrays: no copies
        meta = {"run_id": run_id, "model_id": model_id, "version": str(version),
                "params_sha256": digest, "format": "daa-prime/flat-v1",
                "momentum_sha256": f32_digest(momentum)}
        save_f32(self.ckpt_dir / self._name(version),
                 {"params": params, "outer_momentum": momentum}, meta)
        return Checkpoint(version=version, params=params, momentum=momentum,
                          params_digest=digest)

    def read_checkpoint(self, name: str) -> Checkpoint:
        path = self.ckpt_dir / name
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            params = fh.get_tensor("params")
            momentum = fh.get_tensor("outer_momentum")
        digest = f32_digest(params)
        if digest != meta.get("params_sha256"):
            raise RuntimeError(f"checkpoint {path} is corrupt: params digest {digest} != "
                               f"recorded {meta.get('params_sha256')}")
        if f32_digest(momentum) != meta.get("momentum_sha256"):
            raise RuntimeError(f"checkpoint {path} is corrupt: outer momentum digest mismatch")
        return Checkpoint(version=int(meta["version"]), params=params, momentum=momentum,
                          params_digest=digest)

    @_locked
    def latest(self) -> tuple[int, str, str]:
        """(version, checkpoint file name, params digest) of the last committed state."""
        row = self.db.execute("SELECT round, checkpoint, params_digest FROM rounds "
                              "ORDER BY round DESC LIMIT 1").fetchone()
        if row is not None:
            return row[0] + 1, row[1], row[2]
        run = self.db.execute("SELECT checkpoint, params_digest FROM run").fetchone()
        if run is None:
            raise RuntimeError("no run in this data dir")
        return 0, run[0], run[1]

    def load_latest(self) -> Checkpoint:
        version, name, digest = self.latest()
        ckpt = self.read_checkpoint(name)
        if ckpt.params_digest != digest or ckpt.version != version:
            raise RuntimeError(f"checkpoint {name} does not match the committed round")
        return ckpt

    def latest_path(self) -> Path:
        return self.ckpt_dir / self.latest()[1]

    # -- rounds --------------------------------------------------------------------------
    @_locked
    def commit_round(self, *, round_: int, ckpt_params: np.ndarray, momentum: np.ndarray,
                     run_id: str, model_id: str, attempts: int, eval_loss: float | None,
                     train_loss: float | None, updates: list[UpdateRow], bytes_up: int,
                     bytes_down: int, duration_s: float, keep: int) -> Checkpoint:
        if round_ != self.latest()[0]:  # checked BEFORE the file is written: never overwrite
            raise IntegrityError(f"round {round_} cannot be committed: the next round "
                                         f"to commit is {self.latest()[0]}")
        ckpt = self.write_checkpoint(round_ + 1, ckpt_params, momentum, run_id=run_id,
                                     model_id=model_id)
        with self.db.transaction():
            self.db.execute("INSERT INTO rounds VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                            (round_, time.time(), attempts, len(updates),
                             finite_or_none(eval_loss), finite_or_none(train_loss),
                             ckpt.params_digest, self._name(round_ + 1), sql_int(bytes_up),
                             sql_int(bytes_down), finite_or_none(duration_s) or 0.0))
            self.db.executemany("INSERT INTO updates VALUES (?,?,?,?,?,?,?)",
                                [(round_, u.node_id, u.digest, sql_int(u.bytes),
                                  finite_or_none(u.train_loss), sql_int(u.samples),
                                  finite_or_none(u.compute_s) or 0.0) for u in updates])
            batch = None
            if self.round_ledger is not None:  # the round's ledger entries, same transaction
                batch = self.round_ledger.round_batch(round_, updates)
                self._insert_ledger(batch)
        if batch is not None and self.round_ledger is not None:
            self.round_ledger.done(batch)
        self._prune(keep)
        return ckpt

    def _prune(self, keep: int) -> None:
        names = [r[0] for r in self.db.execute(
            "SELECT checkpoint FROM rounds ORDER BY round DESC LIMIT ?", (keep,))]
        names.append(self.db.execute("SELECT checkpoint FROM run").fetchone()[0])
        for path in self.ckpt_dir.glob("v*.safetensors"):
            if path.name not in names:
                path.unlink(missing_ok=True)

    @_locked
    def rounds(self, *, limit: int = 1000, since: int = -1) -> list[dict[str, Any]]:
        cur = self.db.execute(
            "SELECT round, committed_at, attempts, n_updates, eval_loss, train_loss, "
            "params_digest, bytes_up, bytes_down, duration_s FROM rounds WHERE round > ? "
            "ORDER BY round LIMIT ?", (since, limit))
        cols = [d[0] for d in cur.description]
        return [{k: finite_or_none(v) if isinstance(v, float) else v
                 for k, v in zip(cols, row, strict=True)} for row in cur]

    @_locked
    def update_keys(self, round_: int) -> dict[str, str]:
        """node id -> digest of the updates committed for `round_`."""
        return dict(self.db.execute("SELECT node_id, digest FROM updates WHERE round = ?",
                                    (round_,)).fetchall())

    # -- rejections (the evidence later slashing reads) ---------------------------------
    @_locked
    def record_rejection(self, *, round_: int | None, node_id: str, digest: str | None,
                         code: str, reason: str, validators: list[str]) -> bool:
        """One refused update or frame of an AUTHENTICATED node, with why and who judged.
        Counted always; kept as a row only while the node has fewer than
        MAX_REJECTION_ROWS_PER_NODE_ROUND rows for that round and MAX_REJECTION_ROWS_PER_NODE
        in all (the sample). Returns whether a row was written."""
        rnd = round_ if isinstance(round_, int) and -1 <= round_ <= MAX_INT else None
        same = "round IS NULL" if rnd is None else "round = ?"
        per_round, total = self.db.execute(
            f"SELECT COALESCE(SUM(CASE WHEN {same} THEN 1 ELSE 0 END), 0), COUNT(*) "
            "FROM rejections WHERE node_id = ?",
            (node_id,) if rnd is None else (rnd, node_id)).fetchone()
        keep: bool = (per_round < MAX_REJECTION_ROWS_PER_NODE_ROUND
                      and total < MAX_REJECTION_ROWS_PER_NODE)
        with self.db.transaction():
            if keep:
                self.db.execute("INSERT INTO rejections (at, round, node_id, digest, code, "
                                "reason, validators) VALUES (?,?,?,?,?,?,?)",
                                (time.time(), rnd, node_id, digest, code,
                                 reason[:MAX_REASON_CHARS], json.dumps(validators)))
            self.db.execute("INSERT INTO rejection_counts VALUES (?,?,1,?) ON CONFLICT "
                            "(node_id, code) DO UPDATE SET n = rejection_counts.n + 1, "
                            "stored = rejection_counts.stored + ?",
                            (node_id, code, int(keep), int(keep)))
        return keep

    @_locked
    def rejection_counts(self, node_id: str | None = None) -> list[dict[str, Any]]:
        """Every refusal of authenticated nodes by (node, code): `n` refused, `stored` kept
        as rows in `rejections`."""
        sql = "SELECT node_id, code, n, stored FROM rejection_counts"
        args: tuple[Any, ...] = ()
        if node_id:
            sql, args = sql + " WHERE node_id = ?", (node_id,)
        cur = self.db.execute(sql + " ORDER BY node_id, code", args)
        return [dict(zip(("node_id", "code", "n", "stored"), row, strict=True)) for row in cur]

    @_locked
    def rejection_rows_per_node(self) -> dict[str, int]:
        """node id -> rows it holds in `rejections` plus `rejection_counts` (bounded)."""
        out: dict[str, int] = {}
        for table in ("rejections", "rejection_counts"):
            for node, n in self.db.execute(f"SELECT node_id, COUNT(*) FROM {table} "
                                           "GROUP BY node_id"):
                out[node] = out.get(node, 0) + int(n)
        return out

    @_locked
    def rejections(self, *, limit: int = 1000, node_id: str | None = None,
                   since_id: int = 0) -> list[dict[str, Any]]:
        sql = ("SELECT id, at, round, node_id, digest, code, reason, validators FROM rejections "
               "WHERE id > ?" + (" AND node_id = ?" if node_id else "") + " ORDER BY id LIMIT ?")
        args: tuple[Any, ...] = (since_id, node_id, limit) if node_id else (since_id, limit)
        cur = self.db.execute(sql, args)
        cols = [d[0] for d in cur.description]
        out = [dict(zip(cols, row, strict=True)) for row in cur]
        for row in out:
            row["validators"] = json.loads(row["validators"])
        return out

    # -- nodes ---------------------------------------------------------------------------
    @_locked
    def shard_for(self, node_id: str, runtime: str, n_shards: int) -> int:
        """Stable shard per node: the least-used shard when first seen."""
        row = self.db.execute("SELECT shard FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        if row is not None:
            return int(row[0])
        counts = dict(self.db.execute("SELECT shard, COUNT(*) FROM nodes GROUP BY shard"))
        shard = min(range(n_shards), key=lambda s: (counts.get(s, 0), s))
        with self.db.transaction():
            self.db.execute("INSERT INTO nodes VALUES (?,?,?,?)",
                            (node_id, shard, runtime, time.time()))
        return shard

    # -- ledger (server.ledger: signed, hash-chained entries) ----------------------------
    def _insert_ledger(self, batch: LedgerAppend) -> None:
        self.db.executemany("INSERT INTO ledger VALUES (?,?,?,?,?,?)", batch.rows)
        self.db.executemany("INSERT INTO ledger_evidence VALUES (?,?) ON CONFLICT (hash) "
                            "DO NOTHING", [(h, d.hex()) for h, d in batch.blobs.items()])

    @_locked
    def append_ledger(self, batch: LedgerAppend) -> None:
        """Entries that belong to no round (genesis, requests), in their own transaction."""
        with self.db.transaction():
            self._insert_ledger(batch)

    @_locked
    def ledger_records(self) -> list[dict[str, Any]]:
        """Every entry in seq order: {entry, hash, sig}."""
        return [{"entry": json.loads(entry), "hash": h, "sig": sig} for entry, h, sig in
                self.db.execute("SELECT entry, hash, sig FROM ledger ORDER BY seq")]

    @_locked
    def ledger_blobs(self) -> dict[str, bytes]:
        return {h: bytes.fromhex(d) for h, d in
                self.db.execute("SELECT hash, data FROM ledger_evidence")}

    # -- autotune (server.autotune: the settings of each round and why) -----------------
    @_locked
    def record_autotune(self, *, round_: int, settings: dict[str, Any],
                        changes: list[dict[str, Any]], inputs: dict[str, Any]) -> None:
        """The settings decided for `round_` with their reasons and inputs (a retried
        decision for the same round replaces the row)."""
        with self.db.transaction():
            self.db.execute("DELETE FROM autotune WHERE round = ?", (sql_int(round_),))
            self.db.execute("INSERT INTO autotune VALUES (?,?,?,?,?)",
                            (sql_int(round_), time.time(), json.dumps(settings),
                             json.dumps(changes), json.dumps(inputs)))

    @_locked
    def autotune_decisions(self, *, since: int = -1, limit: int = 1000,
                           newest: bool = False) -> list[dict[str, Any]]:
        """Decisions for rounds after `since`, oldest first (`newest`: the last `limit`)."""
        order = "DESC" if newest else "ASC"
        cur = self.db.execute("SELECT round, decided_at, settings, changes, inputs FROM "
                              f"autotune WHERE round > ? ORDER BY round {order} LIMIT ?",
                              (since, limit))
        out = [{"round": r, "decided_at": at, "settings": json.loads(st),
                "changes": json.loads(ch), "inputs": json.loads(inp)}
               for r, at, st, ch, inp in cur]
        return out[::-1] if newest else out

    @_locked
    def autotune_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM autotune").fetchone()[0])
