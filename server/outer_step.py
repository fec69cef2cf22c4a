"""The server's outer step, by the run's `outer` option: DiLoCo's Nesterov SGD
(shared.outer) or SparseLoCo's sparse 2-bit step (shared.sparseloco), which also returns the
RoundOpen payload that takes a node holding the previous params to the new ones."""

from __future__ import annotations

import numpy as np

from server.config import RunConfig
from shared.outer import OuterConfig, outer_step
from shared.sparseloco import SparseOuter, server_step


def commit_step(config: RunConfig, params: np.ndarray, aggregate: np.ndarray,
                momentum: np.ndarray) -> tuple[np.ndarray, np.ndarray, bytes | None]:
    """(new params, new momentum slot, sparse RoundOpen payload or None)."""
    if config.outer == "sparseloco":
        cfg = SparseOuter.from_params(config.outer_lr, config.outer_params)
        theta, state, payload = server_step(params, aggregate, momentum, cfg)
        return theta, state, payload
    outer = OuterConfig(lr=config.outer_lr, momentum=config.outer_momentum)
    theta, m = outer_step(params, aggregate, momentum, outer)
    return np.asarray(theta, np.float32), np.asarray(m, np.float32), None
