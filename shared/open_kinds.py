"""What a participant's RoundOpens carried, counted: the tab's and the simulator's downlink.

The server picks each node's RoundOpen kind (server/roundopen.py): "full" params, a params
"delta", SparseLoCo's "sparse" step, or a p2p "outer" step. A driver that wants to show or
assert which it got wraps its participant's resolver (the function that turns a RoundOpen into
theta_r and checks its digest) with `OpenKinds.watch(part)`: every RoundOpen resolved is
counted by kind, and every one that did not give the server's params (a malformed payload, a
base the node does not hold, a digest mismatch) as a resync, since the participant then drops
its params and reconnects for the full ones.

    kinds = OpenKinds.watch(part)
    ...
    kinds.counts  # {"full": 1, "delta": 0, "sparse": 3, "outer": 0, "resyncs": 0}

Also which Hello feature says "this node applies sparse steps": `sparse_features()`.
"""

from __future__ import annotations

from typing import Any

from shared.downlink import is_outer_step
from shared.errors import BadUpdate
from shared.sparseloco import FEATURE as SPARSE_FEATURE
from shared.sparseloco import can_step, is_sparse_step

KINDS = ("full", "delta", "sparse", "outer")


def kind_of(msg: Any) -> str:
    """The kind of a RoundOpen, read from its payload (server/roundopen.py's names)."""
    if msg.base_digest is None:
        return "full"  # "full+m" too: the params, then the outer momentum
    if is_sparse_step(msg.payload):
        return "sparse"
    if is_outer_step(msg.payload):
        return "outer"
    return "delta"


def sparse_features() -> tuple[str, ...]:
    """("sparse-step",) where this runtime applies sparse steps (numpy, or the tab's JS
    registered with shared.platform), else (): a node must not ask for what it cannot do."""
    return (SPARSE_FEATURE,) if can_step() else ()


class OpenKinds:
    """A participant's resolver, counting what it resolves (`counts`)."""

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver
        self.counts = {**dict.fromkeys(KINDS, 0), "resyncs": 0}

    @classmethod
    def watch(cls, part: Any) -> OpenKinds:
        """Wrap `part.resolver` (a Participant) with a counting one; returns the counter."""
        kinds = cls(part.resolver)
        part.resolver = kinds
        return kinds

    def __call__(self, msg: Any, held: Any, held_digest: str | None) -> Any:
        try:
            theta = self.resolver(msg, held, held_digest)
        except BadUpdate:
            self.counts["resyncs"] += 1
            raise
        self.counts[kind_of(msg)] += 1
        return theta
