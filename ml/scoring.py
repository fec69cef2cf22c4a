"""Scoring candidate updates on held-out data: the server's validator and `--role validator`.

`ProbeScorer` measures the held-out loss of theta and of theta - Delta_i for each candidate
(shared.validation explains the rule that turns these into verdicts). The server scores on
the FIRST `samples` examples of the run's validation split; a validator node on the LAST
`samples`, so the two look at different data where the split is large enough.

`ValidatorRole` is what a node started with `--role validator` does instead of training:
keep theta_r from each RoundOpen, answer each ValidateRequest with a signed Verdict.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from typing import Literal

import numpy as np

from ml.workload import Workload
from ml.zoo import evaluate, load_flat
from shared.codecs import decode_update
from shared.errors import ProtocolError
from shared.messages import RoundOpen, ValidateRequest, Verdict

log = logging.getLogger("ml.scoring")


class ProbeScorer:
    """Held-out loss of theta and of theta - Delta for each Delta. Thread-safe."""

    def __init__(self, work: Workload, samples: int, *,
                 side: Literal["head", "tail"] = "head") -> None:
        ds = work.dataset
        n = int(np.asarray(ds.x_val).shape[0])
        k = max(1, min(samples, n))
        sl = slice(0, k) if side == "head" else slice(n - k, n)
        self.x, self.y = np.asarray(ds.x_val)[sl], np.asarray(ds.y_val)[sl]
        self.model = work.new_model()
        self.lock = threading.Lock()

    def loss(self, params: np.ndarray) -> float | None:
        with self.lock:
            load_flat(self.model, params)
            value = evaluate(self.model, self.x, self.y)
        return value if math.isfinite(value) else None

    def score(self, theta: np.ndarray,
              deltas: Sequence[np.ndarray]) -> tuple[float | None, list[float | None]]:
        """(loss(theta), [loss(theta - delta) for delta in deltas])."""
        base = self.loss(theta)
        out: list[float | None] = []
        for d in deltas:
            cand = theta - np.asarray(d, dtype=np.float32)
            out.append(self.loss(cand) if np.isfinite(cand).all() else None)
        return base, out


class ValidatorRole:
    """A validator node's state: the current round's theta and its scorer."""

    def __init__(self, work: Workload, samples: int = 512) -> None:
        self.work = work
        self.scorer = ProbeScorer(work, samples, side="tail")
        self.theta: np.ndarray | None = None
        self.round: int | None = None
        self.params_digest: str | None = None
        self.judged = 0

    def on_round_open(self, msg: RoundOpen) -> None:
        self.theta = np.frombuffer(msg.payload, dtype="<f4").astype(np.float32)
        self.round, self.params_digest = msg.round, msg.params_digest

    def verdict(self, req: ValidateRequest, *, node_id: str) -> Verdict:
        """Score every candidate of `req` (runs in a worker thread: it evaluates a model)."""
        if self.theta is None or req.params_digest != self.params_digest:
            raise ProtocolError(f"validation request for params {req.params_digest[:12]} but "
                                f"this validator holds {str(self.params_digest)[:12]}")
        deltas: list[np.ndarray | None] = []
        for i in range(len(req.candidates)):
            try:
                vec = decode_update(req.candidate_payload(i), req.length, expect=req.codec,
                                    layout=self.work.manifest)
                deltas.append(np.asarray(vec, dtype=np.float32))
            except ProtocolError as exc:  # undecodable: scored as "not finite" (rejected)
                log.warning("candidate %d of round %d does not decode: %s", i, req.round, exc)
                deltas.append(None)
        good = [d for d in deltas if d is not None]
        base, losses = self.scorer.score(self.theta, good)
        it = iter(losses)
        scores = [{"node_id": c["node_id"], "digest": c["digest"],
                   "loss": next(it) if d is not None else None}
                  for c, d in zip(req.candidates, deltas, strict=True)]
        self.judged += len(scores)
        log.info("round %d: scored %d candidates (base loss %s)", req.round, len(scores),
                 f"{base:.4f}" if base is not None else "n/a")
        return Verdict(run_id=req.run_id, round=req.round, node_id=node_id, base_loss=base,
                       scores=scores)
