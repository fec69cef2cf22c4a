"""Scoring candidate updates on held-out data: the server's validator and `--role validator`.

`ProbeScorer` measures the held-out loss of theta and of theta - Delta_i for each candidate
(shared.validation explains the rule that turns these into verdicts). The server scores on
the FIRST `samples` examples of the run's validation split; a validator node on the LAST
`samples`, so the two look at different data where the split is large enough.

`score_candidates` is a validator node's kernel (`--role validator`): the participant
(shared/participant.py) holds theta_r and turns the scores into a signed Verdict.
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
from shared.layout import TensorSlot

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


def score_candidates(scorer: ProbeScorer, theta: np.ndarray, payloads: Sequence[bytes], *,
                     length: int, codec: str, layout: Sequence[TensorSlot]
                     ) -> tuple[float | None, list[float | None]]:
    """A validator's kernel: decode each candidate payload (one that does not decode scores
    None, "not finite", and is rejected) and score theta - Delta on the held-out rows."""
    deltas: list[np.ndarray | None] = []
    for i, payload in enumerate(payloads):
        try:
            vec = decode_update(payload, length, expect=codec, layout=layout)
            deltas.append(np.asarray(vec, dtype=np.float32))
        except ProtocolError as exc:
            log.warning("candidate %d does not decode: %s", i, exc)
            deltas.append(None)
    base, losses = scorer.score(theta, [d for d in deltas if d is not None])
    it = iter(losses)
    return base, [next(it) if d is not None else None for d in deltas]
