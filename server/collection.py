"""The open round's collection: which updates it has taken, and the guards they pass.

One `RoundCollection` per coordinator. It holds the open round's state machine
(shared.rounds.RoundState) and what the server keeps of each accepted update: its store row,
its decoded vector (ws/star only: in p2p runs the update stays with its node) and its encoded
payload (for validator nodes). Every update message, `Submit` (ws/star) or `Ready` (p2p),
goes through `take`, which runs the guards in one place, in this order:

1. a round is open, else `WrongRound`;
2. the sender joined as a trainer and, with DP sampling, was sampled for the open round,
   else `BadUpdate` (field node_id);
3. the message is the run's kind of update (the reduction's `update_type`), else `BadUpdate`
   (field msg_type);
4. the codec (Submit) the node was given for that round (the run's, or autotune's: see
   server.autotune) and the model's length, else `BadUpdate` (codec / length);
5. the round is not being reduced (p2p), else `BadUpdate` (field round);

then the stale policy (a Submit for an already committed round), the round state's own check
(round, exclusion, duplicate, conflict), the decode, and the record.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import numpy as np

from server.autotune import AutotuneLoop
from server.config import RunConfig
from server.peers import Peer
from server.reduction import Reduction
from server.store import UpdateRow
from shared.errors import BadUpdate, StaleUpdate, WrongRound
from shared.messages import Ready, Submit
from shared.rounds import Outcome, RoundState

log = logging.getLogger("server.coordinator")


class RoundCollection:
    def __init__(self, config: RunConfig, n_params: int, reduction: Reduction,
                 counters: Counter[str], autotune: AutotuneLoop | None = None, *,
                 takes_part: Callable[[Peer], bool] | None = None) -> None:
        self.config, self.n_params = config, n_params
        self.takes_part = takes_part  # DP sampling: whether a trainer gets the open round
        self.reduction = reduction
        self.autotune = autotune  # the codec each node was given; measures each update
        self.counters = counters  # accepted, duplicates, stale_dropped, stale_applied
        self.state: RoundState | None = None  # the open round; None before the first/after the last
        self.rows: dict[str, UpdateRow] = {}  # node id -> its accepted update's store row
        self.vectors: dict[str, np.ndarray] = {}  # node id -> decoded update (ws/star)
        self.payloads: dict[str, bytes] = {}  # node id -> encoded update (ws/star; validators)

    def open(self, state: RoundState) -> None:
        """Start collecting for `state`: nothing taken yet."""
        self.state = state
        self.rows.clear()
        self.vectors.clear()
        self.payloads.clear()

    def finish(self) -> None:
        self.state = None

    def nodes(self) -> list[str]:
        """The nodes whose update the open round holds, sorted."""
        return sorted(self.state.updates) if self.state is not None else []

    # -- taking updates ------------------------------------------------------------------
    def guard(self, peer: Peer, msg: Submit | Ready) -> RoundState:
        """The guards every update message passes (see the module doc); the open round."""
        state = self.state
        if state is None:
            raise WrongRound("no round is open", field="round")
        if peer.role != "trainer":
            raise BadUpdate(f"a {peer.role} does not submit updates", field="node_id")
        if msg.round == state.round and self.takes_part is not None \
                and not self.takes_part(peer):
            raise BadUpdate(f"not sampled for round {msg.round} (DP sampling)", field="node_id")
        if not isinstance(msg, self.reduction.update_type):
            raise BadUpdate(self.reduction.wrong_update, field="msg_type")
        if isinstance(msg, Submit) and not self.config.secagg and not (  # secagg: codec

                self.autotune.accepts_codec(peer.node_id, msg.round, msg.codec)
                if self.autotune is not None else msg.codec == self.config.codec):
            raise BadUpdate(f"codec {msg.codec!r} is not the codec this node was given for "
                            f"round {msg.round} (run codec {self.config.codec!r})",
                            field="codec")
        if msg.length != self.n_params:
            raise BadUpdate(f"wrong shape: update has {msg.length} values, the model has "
                            f"{self.n_params}", field="length")
        if self.reduction.busy:
            raise BadUpdate("the round is being reduced; it takes no more updates",
                            field="round")
        return state

    def take(self, peer: Peer, msg: Submit | Ready) -> Outcome:
        """Guard, check, decode and record one update; ACCEPTED or DUPLICATE (counted once),
        or a ProtocolError that says why not. Nothing is recorded unless it is accepted."""
        state = self.guard(peer, msg)
        weight = 1.0
        if isinstance(msg, Submit) and msg.round < state.round:
            try:
                weight = self._stale_weight(msg.round, state.round)
            except StaleUpdate:
                if self.autotune is not None:  # too late, but its timing still tells
                    self.autotune.on_update(peer.node_id, peer.runtime, msg, len(msg.payload),
                                            staleness=state.round - msg.round, late=True)
                raise
        as_round = state.round if weight != 1.0 else msg.round
        outcome = state.check(node_id=peer.node_id, round_=as_round, digest=msg.digest)
        if outcome is Outcome.ACCEPTED:
            vec = self.reduction.vector(msg)  # BEFORE recording: it may not decode
            if weight != 1.0 and vec is not None:
                vec = vec * np.float32(weight)
                self.counters["stale_applied"] += 1
                log.info("late update from %s for round %d applied to round %d with weight "
                         "%.3g", peer.node_id[:12], msg.round, state.round, weight)
            state.submit(node_id=peer.node_id, round_=as_round, digest=msg.digest)
            if vec is not None:
                self.vectors[peer.node_id] = vec
            size = 4 * msg.length
            if isinstance(msg, Submit):
                self.payloads[peer.node_id] = msg.payload
                size = len(msg.payload)
            self.rows[peer.node_id] = UpdateRow(
                node_id=peer.node_id, digest=msg.digest, bytes=size, train_loss=msg.train_loss,
                samples=msg.samples, compute_s=msg.compute_s)
            if self.autotune is not None:
                self.autotune.on_update(peer.node_id, peer.runtime, msg, size,
                                        staleness=state.round - msg.round)
            peer.accepted += 1
            peer.state = "submitted"
            self.counters["accepted"] += 1
        else:
            self.counters["duplicates"] += 1
            log.info("duplicate update from %s for round %d (counted once)",
                     peer.node_id[:12], msg.round)
        return outcome

    def _stale_weight(self, round_: int, current: int) -> float:
        """Weight of a late update for `round_` (< current) under the stale policy, or
        StaleUpdate (counted) when the policy drops it."""
        age = current - round_
        cfg = self.config
        if cfg.stale_policy == "weight" and age <= cfg.max_staleness:
            return float(cfg.stale_weight ** age)
        self.counters["stale_dropped"] += 1
        why = ("the run drops late updates (stale_policy drop)" if cfg.stale_policy == "drop"
               else f"it is {age} rounds old (max_staleness {cfg.max_staleness})")
        raise StaleUpdate(f"round {round_} was already committed; the current round is "
                          f"{current}; {why}", field="round")

    # -- leaving the round ---------------------------------------------------------------
    def drop(self, node_id: str) -> None:
        """`node_id`'s update leaves the open round (p2p: it left the reduction)."""
        if self.state is not None:
            self.state.updates.pop(node_id, None)
        self.rows.pop(node_id, None)
        self.vectors.pop(node_id, None)
        self.payloads.pop(node_id, None)

    def exclude(self, node_id: str, reason: str) -> None:
        """Validators rejected `node_id`'s update: out of the round, resubmissions refused."""
        assert self.state is not None
        self.state.exclude(node_id, reason)
        self.rows.pop(node_id, None)
        self.vectors.pop(node_id, None)
        self.payloads.pop(node_id, None)
