"""A node's side of the run's codec: worker momentum, the error-feedback residual and
PowerSGD's warm Q.

One object per (codec, setting); a new one is a reset. Used by the native client and by the
simulator's nodes, so both send exactly what a real node sends.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared.codecs import Codec, PowerSGD
from shared.layout import TensorSlot
from shared.outer import worker_momentum


class UpdateEncoder:
    def __init__(self, codec: Codec, *, error_feedback: bool,
                 layout: Sequence[TensorSlot], momentum: float = 0.0) -> None:
        self.codec = codec
        self.beta = momentum  # worker momentum (Welcome.worker_momentum); 0: none
        self.momentum: np.ndarray | None = None  # m, the momentum of past deltas
        self.error_feedback = error_feedback
        self.layout = layout
        self.residual: np.ndarray | None = None  # what the codec dropped (None: nothing)
        self.psgd_state: dict[str, np.ndarray] | None = None  # PowerSGD's warm-started Q

    def encode(self, delta: np.ndarray) -> bytes:
        """Encode delta (its worker momentum when beta > 0; + residual); keep what the codec
        lost for the next round."""
        if self.beta > 0:
            delta = np.asarray(worker_momentum(self.momentum, delta, self.beta))
            self.momentum = delta
        x = delta
        if self.error_feedback and self.residual is not None \
                and self.residual.shape == delta.shape:
            x = (delta + self.residual).astype(np.float32)
        if isinstance(self.codec, PowerSGD):
            payload, self.psgd_state = self.codec.encode_with_state(
                x, layout=self.layout, state=self.psgd_state)
        else:
            payload = self.codec.encode(x, layout=self.layout)
        if self.error_feedback:
            sent = np.asarray(self.codec.decode(payload, x.size, layout=self.layout))
            res = (x - sent).astype(np.float32)
            self.residual = res if np.any(res) else None  # a lossless codec leaves nothing
        return payload
