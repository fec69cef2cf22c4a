"""Overlapped rounds: train round t+1 while round t's update is uploaded and aggregated.

Run option `overlap` (server config, announced in the Welcome; off by default). Without it a
participant idles from its Submit of round t until the RoundOpen of round t+1 (upload +
aggregation + outer step + downlink). With it, right after the Submit of round t it runs the
inner steps of round t+1 "ahead", from its own local params theta_i^t (where round t's inner
steps ended). When round t+1 opens with the new global params theta_{t+1}, the progress made
ahead is kept and moved onto them (the merge):

    local  <-  theta_{t+1} + (local - theta_i^t)

and the remaining inner steps (up to the round's H in all) run from there. The update sent for
round t+1 is then an ordinary pseudo-gradient against exactly the params the server opened
round t+1 with (the RoundOpen's params_digest; the participant's Job keeps that digest):

    Delta_{t+1} = theta_{t+1} - theta_final

so the server checks and aggregates it like any other update (same round, same length, same
codec, error feedback and worker momentum); nothing at the server changes but the flag. The
steps run ahead start from stale params: that is the one-step delay (Streaming DiLoCo's
overlapping communication, arXiv 2501.18512, merges local and global params after the delay
with a mixing factor; this keeps all the local progress instead, the plain one-outer-step
overlap of "Eager updates", arXiv 2502.12996). At most one round is trained ahead: a node that
finished its steps ahead before the RoundOpen came waits for it.

This module holds the math (pure functions over shared.vec vectors, exact in float32) and the
participant's bookkeeping (`Ahead`); drivers that can train ahead say so (`supported`: native
nodes with one process, tabs (browser/node/ahead.js, its merge golden-checked against `merge`),
bench.simulate's nodes); the others (`--nproc` > 1 nodes) train as without the option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.vec import add, sub

Vector = Any  # numpy float32 array natively, array('f') in Pyodide (shared.vec)


def local_params(theta: Vector, delta: Vector) -> Vector:
    """Where a round's inner steps ended: theta_r - Delta (Delta = theta_r - theta_i)."""
    return sub(theta, delta)


def merge(new_global: Vector, local: Vector, start: Vector) -> Vector:
    """The params after the merge: new_global + (local - start), in float32 (`start` is
    where the steps run ahead began, `local` where they are now)."""
    return add(new_global, sub(local, start))


def pseudo_gradient(base: Vector, final: Vector) -> Vector:
    """The update of a round opened with `base`: base - final."""
    return sub(base, final)


@dataclass(slots=True)
class Ahead:
    """One participant's overlap state: whether the run and the driver do it, and which
    round's Submit the steps now run ahead follow (None: none run ahead)."""

    supported: bool = False  # the driver can train ahead and merge (native nodes, tabs)
    enabled: bool = False  # the run asks for it (Welcome.overlap) and the driver can
    after: int | None = None  # round whose Submit the steps ahead follow
    merges: int = 0  # RoundOpens merged into steps run ahead

    def on_welcome(self, run_option: bool) -> None:
        self.enabled = bool(run_option) and self.supported
        if not self.enabled:
            self.after = None

    def after_submit(self, round_: int) -> list[dict[str, Any]]:
        """Round `round_` was submitted: the event that starts the steps of the next round
        ahead (none when the option is off)."""
        if not self.enabled:
            return []
        self.after = round_
        return [{"kind": "train_ahead", "after_round": round_}]

    def takes(self, round_: int) -> bool:
        """Whether the RoundOpen of `round_` is merged into the steps run ahead (a later
        round than the submitted one); the steps ahead are then the round's."""
        if self.after is None or round_ <= self.after:
            return False
        self.after = None
        self.merges += 1
        return True

    def drop(self) -> None:
        """The steps ahead are abandoned (a new run, the driver stopped them)."""
        self.after = None
