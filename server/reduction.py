"""How a round's updates become one aggregate: one strategy per topology, chosen once.

A `Reduction` is what differs between the topologies of `transport` (in the spirit of Flower's
strategies): which message carries a trainer's update, what the server keeps of it, what a
trainer's RoundOpen carries, and how the round's updates are reduced to the pseudo-gradient
the outer step applies.

- `ServerReduction` (ws, star): every update comes to the server (WebSocket or its aiortc
  peer) in a `Submit`; the server decodes it and applies the run's robust rule
  (shared.aggregation) over the round's vectors (streamed updates: from their spool files,
  block by block, server.spool_rules). With `aggregation_weights = "stake"` (rule
  `mean` only, RunConfig refuses the others) each update weighs its node's ledger stake at
  the time of the reduction; a node without stake weighs 0, and a round whose nodes hold no
  stake at all is retried. With autotune's time budgets (server.autotune, rule `mean`,
  `aggregation_weights = "equal"`) each update weighs its inner steps (the samples it
  trained on), as in heterogeneous DiLoCo variants: a node that fit more steps in the
  budget counts more.
- `server.p2p.P2PReduction` (p2p): a trainer keeps its update and sends a `Ready`; the members
  reduce shards among themselves and the server only checks the owners' results.
- `server.hierarchy.HierarchyReduction` (p2p with `p2p_groups > 0`): groups of members reduce
  at two elected aggregators each; the server checks them and combines the group results.

`choose_reduction` is the one place that looks at `transport` to pick one.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Protocol

import numpy as np

from server.evidence import Evidence
from server.p2p import P2PReduction
from server.peers import Connection, Nodes, Peer
from server.runstate import RunState
from server.spool import spooled
from server.spool_rules import aggregate as spooled_aggregate
from server.spool_rules import weighted_mean
from shared.aggregation import estimate_f, get_rule
from shared.codecs import decode_update
from shared.errors import BadUpdate
from shared.messages import Hello, Ready, Shard, Submit
from shared.outer import history_reference
from shared.rounds import RoundState

if TYPE_CHECKING:
    from server.collection import RoundCollection

log = logging.getLogger("server.coordinator")


class Reduction(Protocol):
    """A topology's reduction strategy, as the coordinator and its round collection use it."""

    update_type: type[Submit] | type[Ready]  # the message a trainer's update travels in
    wrong_update: str  # why the other kind of update message is refused

    @property
    def busy(self) -> bool: ...  # the round is being reduced: it takes no more updates

    def vector(self, msg: Submit | Ready) -> np.ndarray | None:
        """The accepted update as the server keeps it (decoded), or None where it stays with
        its node. Raises BadUpdate when the payload does not decode."""

    def on_join(self, hello: Hello) -> str:
        """Admit a node's Hello (raise a ProtocolError to refuse it); its peer's transport."""

    def open_kind(self, peer: Peer, holds_prev: bool) -> str | None:
        """What this topology's RoundOpen for `peer` carries (see Coordinator.open_frame),
        or None for the default (full params, or the delta where the node holds the last)."""

    async def on_shard(self, conn: Connection, msg: Shard) -> None: ...

    async def reduce(self, state: RoundState, collection: RoundCollection) -> np.ndarray | None:
        """The aggregate of the round's accepted updates, or None when too few are left
        (the round is retried)."""


class ServerReduction:
    """ws / star: decode each update at the server, then the run's robust rule over all."""

    update_type: type[Submit] | type[Ready] = Submit
    wrong_update = "Ready is for transport p2p; submit the update"
    busy = False

    def __init__(self, run: RunState, counters: Counter[str]) -> None:
        self.run, self.config, self.counters = run, run.config, counters
        self.step_weights = False  # autotune: the mean weighs each update by its samples

    def vector(self, msg: Submit | Ready) -> np.ndarray:
        assert isinstance(msg, Submit)
        vec = decode_update(msg.payload, msg.length, expect=msg.codec,
                            layout=self.run.work.manifest)
        return np.asarray(vec, dtype=np.float32)

    def on_join(self, hello: Hello) -> str:
        return "ws"  # "webrtc" / "relay" once a star data channel is offered (server.rtc)

    def open_kind(self, peer: Peer, holds_prev: bool) -> str | None:
        return None

    async def on_shard(self, conn: Connection, msg: Shard) -> None:
        raise BadUpdate(f"this run does not reduce peer to peer (transport "
                        f"{self.config.transport!r}): no shards", field="msg_type")

    async def reduce(self, state: RoundState, collection: RoundCollection
                     ) -> np.ndarray | None:
        nodes = sorted(state.updates)
        vectors = [collection.vectors[n] for n in nodes]
        if self.config.aggregation_weights == "stake":
            return self.stake_weighted(nodes, vectors, state.round)
        if self.step_weights and self.config.aggregator == "mean":
            weights = np.array([collection.rows[n].samples for n in nodes], dtype=np.float64)
            if weights.sum() > 0:
                return weighted_mean(vectors, weights)  # by column blocks, spooled or not
        return self.aggregate(vectors, state.round)

    def stake_weighted(self, nodes: list[str], vectors: list[np.ndarray], round_: int
                       ) -> np.ndarray | None:
        """The mean of `vectors` weighted by their nodes' ledger stakes (None: no stake)."""
        stakes = self.run.ledger.state.stakes
        weights = np.array([stakes.get(n, 0) for n in nodes], dtype=np.float64)
        if weights.sum() <= 0:
            log.warning("round %d: no update's node holds stake; retrying the round", round_)
            return None
        return weighted_mean(vectors, weights)  # by column blocks, spooled or not

    def aggregate(self, vectors: list[np.ndarray], round_: int) -> np.ndarray:
        """The run's rule over the round's updates."""
        cfg = self.config
        f = estimate_f(len(vectors), cfg.byzantine_fraction, rule=cfg.aggregator)
        wanted = estimate_f(len(vectors), cfg.byzantine_fraction)
        if f < wanted:  # the rule's bound on n: say so, every time it bites
            self.counters["f_clamped"] += 1
            log.warning("round %d: %s tolerates at most f=%d of %d updates; byzantine_fraction "
                        "%.2f asks for f=%d", round_, cfg.aggregator, f, len(vectors),
                        cfg.byzantine_fraction, wanted)
        params = dict(cfg.aggregator_params)
        if cfg.aggregator == "centered-clipping" and cfg.cc_reference == "history":
            params["reference"] = history_reference(self.run.momentum, cfg.outer_momentum)
        if spooled(vectors):  # streamed: every rule reads the files by column blocks
            return spooled_aggregate(cfg.aggregator, vectors, f=f, **params)
        return np.asarray(get_rule(cfg.aggregator)(vectors, f=f, **params), dtype=np.float32)


def choose_reduction(run: RunState, nodes: Nodes, evidence: Evidence,
                     counters: Counter[str]) -> Reduction:
    """The strategy for the run's `transport`: the one place that chooses."""
    if run.config.transport == "p2p" and run.config.p2p_groups > 0:
        from server.hierarchy import HierarchyReduction  # groups reduce, the server combines

        return HierarchyReduction(run, nodes, evidence, counters)
    if run.config.transport == "p2p" and run.config.secagg:  # owners sum masked shards
        from server.secagg_p2p import SecAggP2PReduction

        return SecAggP2PReduction(run, nodes, evidence, counters)
    if run.config.transport == "p2p":
        return P2PReduction(run, nodes, evidence, counters)
    if run.config.secagg and run.config.secagg_groups != 0:  # secure and robust (groups)
        from server.secagg_groups_round import SecAggGroupsReduction

        return SecAggGroupsReduction(run, nodes, evidence, counters)
    if run.config.secagg:  # ws / star, the server sums masked updates only
        from server.secagg_round import SecAggReduction

        return SecAggReduction(run, nodes, evidence, counters)
    return ServerReduction(run, counters)
