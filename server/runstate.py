"""The run as committed on disk plus the in-memory global params: create, resume, commit."""

from __future__ import annotations

import logging
import math
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml import memory
from ml.data import DataSpec
from ml.tokenizer import keep_tokenizer_file
from ml.workload import Workload, from_spec, initial_params, resolve
from ml.zoo import evaluate, load_flat
from server.config import RunConfig
from server.eval_view import model_over
from server.ledger import LedgerBook
from server.store import Store, UpdateRow
from shared.downlink import encode_changes
from shared.envelope import Identity
from shared.vec import to_bytes
from transport.identity import load_or_create_identity

log = logging.getLogger("server.run")
# the eval model of a run with more parameters than this is built for each eval over the
# params it evaluates (server.eval_view: no copy) and let go (bench.scale_server)
EVAL_MODEL_KEPT = 16_000_000
EVAL_TOKENS = 512  # tokens per eval batch above EVAL_MODEL_KEPT: a 125M model's activations
# for 8 x 256 tokens at once were ~0.4 GB over theta, theta' and the residual (bench.scale)


@dataclass(eq=False)
class RunState:
    run_id: str  # stable id of the run
    config: RunConfig  # effective config
    store: Store  # database rows (SQLite or PostgreSQL) + checkpoints
    work: Workload  # model + data
    params: np.ndarray  # theta_version
    momentum: np.ndarray  # outer momentum
    version: int  # committed rounds (= the next round's number)
    params_digest: str  # content hash of params
    entropy_floor: float | None  # minimal achievable eval loss (None: unknown)
    eval_loss_init: float | None  # eval loss of theta_0
    identity: Identity | None = None  # the server's ML-DSA-65 key: it signs every frame
    last_round: dict[str, Any] | None = None  # newest committed round row
    params_bytes: bytes = b""  # params as sent in RoundOpen
    prev_digest: str | None = None  # digest of the params before the last commit
    params_changes: bytes | None = None  # params vs the previous ones (shared.downlink)
    sparse_step: bytes | None = None  # outer "sparseloco": the step from the previous params
    _eval_lock: threading.Lock = field(default_factory=threading.Lock)
    _eval_model: torch.nn.Module | None = None
    ledger: LedgerBook = field(init=False)  # stake, rewards, slashes (server.ledger)

    def __post_init__(self) -> None:
        self._share_params()
        if self.identity is None:
            self.identity = load_or_create_identity(self.store.dir, "server.key")
        self.ledger = open_ledger(self)

    def _share_params(self) -> None:
        """RoundOpen's bytes of the params, and the params as a read-only view of them: one
        copy in memory, not two (491 MB at 125M params; bench.scale_server). Params that are
        already such a view of a whole bytes object (server.outer_step) keep those bytes."""
        base = self.params.base
        if (isinstance(base, bytes) and self.params.dtype == np.dtype("<f4")
                and self.params.ndim == 1 and self.params.nbytes == len(base)):
            self.params_bytes = base
        else:
            self.params_bytes = to_bytes(self.params)
        self.params = np.frombuffer(self.params_bytes, dtype="<f4")

    @property
    def n_params(self) -> int:
        return int(self.params.size)

    def evaluate(self, params: np.ndarray) -> float | None:
        """Validation loss (nats) of `params` on the held-out split; None if not finite."""
        with self._eval_lock:
            if params.size > EVAL_MODEL_KEPT:  # its parameters are views of `params`
                model = model_over(self.work.new_model, params)
            else:
                if self._eval_model is None:
                    self._eval_model = self.work.new_model()
                load_flat(self._eval_model, params)
                model = self._eval_model
            ds = self.work.dataset
            n = self.config.eval_samples or len(ds.x_val)  # eval_samples 0: all
            batch = 256
            if params.size > EVAL_MODEL_KEPT:
                per_sample = int(np.prod(np.shape(ds.x_val[:1])[1:])) or 1
                batch = max(1, EVAL_TOKENS // per_sample)
            loss = evaluate(model, ds.x_val[:n], ds.y_val[:n], batch_size=batch)
            del model
            if params.size > EVAL_MODEL_KEPT:
                memory.trim()  # the activations' pages (ml/memory.py)
        return loss if math.isfinite(loss) else None

    def commit(self, *, round_: int, params: np.ndarray, momentum: np.ndarray, attempts: int,
               eval_loss: float | None, train_loss: float | None, updates: list[UpdateRow],
               bytes_up: int, bytes_down: int, duration_s: float,
               sparse_step: bytes | None = None) -> dict[str, Any]:
        """Persist round `round_` atomically, then make theta_{round_+1} the global params
        (`sparse_step`: the sparseloco RoundOpen payload that takes a node there)."""
        ckpt = self.store.commit_round(
            round_=round_, ckpt_params=params, momentum=momentum, run_id=self.run_id,
            model_id=self.work.model_id, attempts=attempts, eval_loss=eval_loss,
            train_loss=train_loss, updates=updates, bytes_up=bytes_up, bytes_down=bytes_down,
            duration_s=duration_s, keep=self.config.keep_checkpoints)
        prev, self.prev_digest = self.params, self.params_digest
        self.params_changes = (encode_changes(prev, ckpt.params)
                               if self.config.delta_downlink else None)
        self.sparse_step = sparse_step
        del prev
        self.params, self.momentum = ckpt.params, ckpt.momentum
        self._share_params()
        self.params_digest = ckpt.params_digest
        self.version = round_ + 1
        self.last_round = self.store.rounds(since=round_ - 1, limit=1)[0]
        if self.n_params > EVAL_MODEL_KEPT:  # the outer step's temporaries are gone by now
            memory.trim()
        return {**self.last_round, "entropy_floor": self.entropy_floor}


def workload_of(config: RunConfig) -> Workload:
    """The workload a new run with `config` trains (what open_run builds for it)."""
    return resolve(model=config.model, flavour=config.flavour, data=config.data,
                   data_path=config.data_path, partition=config.partition,
                   alpha=config.alpha, seed=config.seed, tokenizer=config.tokenizer)


def open_run(data_dir: str | Path, overrides: dict[str, Any],
             base: dict[str, Any] | None = None, db: str | None = None) -> RunState:
    """Resume the run in `data_dir`, or create it from `base` (TOML) + `overrides` (flags).
    `db`: the database of its rows (None: SQLite in `data_dir`; postgresql://...)."""
    store = Store(data_dir, db)
    row = store.load_run()
    if row is None:
        config = RunConfig.from_dict(base or {}).merged(overrides, resuming=False)
        work = workload_of(config)
        rows = len(work.dataset.keys_train)
        if config.n_shards > rows:
            raise ValueError(f"n_shards {config.n_shards} exceeds the {rows} training rows of "
                             f"{config.model}'s data: shards would be empty; use at most {rows}")
        keep_tokenizer_file(store.dir, work.data_spec)  # bpe: tokenizer.json with the run
        run_id = uuid.uuid4().hex[:16]
        theta0 = initial_params(work)
        state = RunState(run_id=run_id, config=config, store=store, work=work, params=theta0,
                         momentum=np.zeros(theta0.shape, np.float32), version=0,
                         params_digest="", entropy_floor=work.dataset.entropy_floor,
                         eval_loss_init=None)
        del theta0  # state.params is a view of its bytes: one copy of theta_0, not two
        state.eval_loss_init = state.evaluate(state.params)
        ckpt = store.create_run(run_id=run_id, config=config.to_dict(), model_id=work.model_id,
                                workload={"model": work.model_config,
                                          "data": work.data_spec.to_dict()},
                                params=state.params, entropy_floor=state.entropy_floor,
                                eval_loss_init=state.eval_loss_init)
        state.params_digest = ckpt.params_digest
        log.info("created run %s: %s, %d params, model id %s", run_id, config.model,
                 work.n_params, work.model_id[:12])
        return state
    stored = RunConfig.from_dict(row["config"])
    if base:
        stored = stored.merged(base, resuming=True)
    config = stored.merged(overrides, resuming=True)
    store.update_config(config.to_dict())
    model_cfg, spec = _stored_workload(store)
    keep_tokenizer_file(store.dir, spec)
    work = from_spec(model_cfg, spec)
    if work.model_id != row["model_id"]:
        raise RuntimeError(f"model id changed: stored {row['model_id']}, rebuilt "
                           f"{work.model_id} (code or data changed under the run)")
    ckpt = store.load_latest()
    rounds = store.rounds(since=ckpt.version - 2, limit=1)
    log.info("resumed run %s at round %d (checkpoint v%d)", row["id"], ckpt.version,
             ckpt.version)
    return RunState(run_id=row["id"], config=config, store=store, work=work,
                    params=ckpt.params, momentum=ckpt.momentum, version=ckpt.version,
                    params_digest=ckpt.params_digest, entropy_floor=row["entropy_floor"],
                    eval_loss_init=row["eval_loss_init"],
                    last_round=rounds[0] if rounds else None)


def _stored_workload(store: Store) -> tuple[dict[str, Any], DataSpec]:
    meta = store.load_workload()
    return meta["model"], DataSpec.from_dict(meta["data"])


def open_ledger(state: RunState) -> LedgerBook:
    """The run's ledger, its round entries committed with each round (Store.round_ledger)."""
    assert state.identity is not None
    book = LedgerBook(state.store, state.identity, state.run_id, state.config)
    state.store.round_ledger = book
    return book
