"""Validation of the round's candidate updates at commit time (the coordinator's part).

Before a round is aggregated, with `validation` on, the server scores every candidate on the
held-out probe set (ml.scoring.ProbeScorer), sends the candidates to every
connected validator node (ValidateRequest) and waits up to `validation_timeout_s` for their
signed Verdicts. shared.validation turns the losses into verdicts and takes the majority.
An excluded update gets an `update_rejected` Error to its sender, a counter, a log line and a
row in the store's `rejections` table (round, node, digest, reason, the validators against it),
and the round is retried if what remains is below quorum.

Streamed updates (`stream_chunk_mb`, server.streams) are spooled: the server scores each
from its file, one at a time (`Spooled`: read from the file, not through the mapping, so the
round's updates never add up in memory). Validator nodes get the candidates that came in one
frame; a streamed candidate's payload is not kept (it would be the memory the spool saves),
so it is scored by the server's probe alone (`validation_server_only` counts them; sending
it on to validators in chunks is not built).

`Validation` is the coordinator's collaborator for this: it reads the open round from the
round collection (server.collection) and reaches nodes through server.peers.Nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from ml.scoring import ProbeScorer
from server.collection import RoundCollection
from server.evidence import Evidence
from server.peers import Connection, Nodes, Peer
from server.spool import read_block
from shared.errors import BadUpdate, UpdateRejected, WrongRound
from shared.messages import Error, ValidateRequest, Verdict
from shared.validation import Score, combine, judge, reference, rejected

if TYPE_CHECKING:
    from server.runstate import RunState

log = logging.getLogger("server.coordinator")


class Spooled(Sequence[np.ndarray]):
    """The round's candidates for the probe: a spooled one is read from its file when the
    scorer gets to it (server.spool.read_block), and let go after."""

    def __init__(self, vectors: list[np.ndarray]) -> None:
        self.vectors = vectors

    def __len__(self) -> int:
        return len(self.vectors)

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[np.ndarray]: ...

    def __getitem__(self, i: int | slice) -> np.ndarray | Sequence[np.ndarray]:
        if isinstance(i, slice):
            return Spooled(self.vectors[i])
        v = self.vectors[i]
        return read_block(v, 0, len(v)) if isinstance(v, np.memmap) else v


class Validation:
    def __init__(self, run: RunState, nodes: Nodes, collection: RoundCollection,
                 evidence: Evidence, counters: Counter[str], rejected: Counter[str]) -> None:
        self.run, self.config, self.nodes = run, run.config, nodes
        self.collection, self.evidence = collection, evidence
        self.counters = counters  # verdicts
        self.rejected = rejected  # by error code: update_rejected
        self._verdicts: dict[str, Verdict] = {}  # validator node id -> its verdict this round
        self._pending = False  # a validation is waiting for verdicts
        self._verdict_in = asyncio.Event()
        self.scores: dict[str, float | None] = {}  # node -> the server's score, last round
        self._scorer: ProbeScorer | None = None

    def on_verdict(self, conn: Connection, msg: Verdict) -> None:
        peer = conn.peer
        assert peer is not None
        if peer.role != "validator":
            raise BadUpdate("only nodes that joined as validators send verdicts",
                            field="node_id")
        state = self.collection.state
        if not self._pending or state is None or msg.round != state.round:
            raise WrongRound(f"no validation is pending for round {msg.round}", field="round")
        self._verdicts[peer.node_id] = msg
        self.counters["verdicts"] += 1
        self._verdict_in.set()

    async def validate(self) -> None:
        """Score the round's candidates (server + connected validator nodes), exclude the
        ones a majority rejects: typed error to the sender, a counter, a recorded reason."""
        state = self.collection.state
        assert state is not None
        cfg, loop = self.config, asyncio.get_running_loop()
        vectors = self.collection.vectors
        nodes = [n for n in sorted(state.updates) if n in vectors]
        if not nodes:
            return
        validators = [p for p in self.nodes.peers.values()
                      if p.ws is not None and p.role == "validator"]
        sendable = [n for n in nodes if n in self.collection.payloads]  # not streamed ones
        if validators and len(sendable) < len(nodes):
            self.counters["validation_server_only"] += len(nodes) - len(sendable)
            log.info("round %d: %d streamed candidate(s) scored by the server alone "
                     "(validator nodes get the %d that came in one frame)", state.round,
                     len(nodes) - len(sendable), len(sendable))
        if not sendable:
            validators = []
        self._verdicts, self._pending = {}, True
        try:
            if validators:
                await self._request_verdicts(sendable, validators)
            if self._scorer is None:
                self._scorer = ProbeScorer(self.run.work, cfg.validation_samples)
            base, losses = await asyncio.to_thread(
                self._scorer.score, self.run.params, Spooled([vectors[n] for n in nodes]))
            self.scores = dict(zip(nodes, losses, strict=True))  # autotune's inputs
            ref = reference(base, losses)
            verdicts = [judge(ref=ref, threshold=cfg.validation_threshold,
                              score=Score(node_id=n, digest=state.updates[n], loss=loss))
                        for n, loss in zip(nodes, losses, strict=True)]
            until = loop.time() + cfg.validation_timeout_s
            while len(self._verdicts) < len(validators) and loop.time() < until:
                self._verdict_in.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._verdict_in.wait(), timeout=until - loop.time())
            for vid, v in self._verdicts.items():
                got = {(s["node_id"], s["digest"]): s["loss"] for s in v.scores}
                vref = reference(v.base_loss, got.values())
                verdicts += [judge(ref=vref, threshold=cfg.validation_threshold,
                                   validator=vid, score=Score(node_id=n, digest=state.updates[n],
                                                              loss=got[(n, state.updates[n])]))
                             for n in nodes if (n, state.updates[n]) in got]
        finally:
            self._pending = False
        for (node_id, digest), vs in combine(verdicts).items():
            if rejected(vs):
                await self._exclude(node_id, digest, vs)

    async def _request_verdicts(self, nodes: list[str], validators: list[Peer]) -> None:
        state = self.collection.state
        assert state is not None
        payloads = self.collection.payloads
        entries, offset = [], 0
        for n in nodes:
            size = len(payloads[n])
            entries.append({"node_id": n, "digest": state.updates[n], "offset": offset,
                            "size": size})
            offset += size
        data = self.nodes.frame(ValidateRequest(
            run_id=self.run.run_id, round=state.round, params_digest=self.run.params_digest,
            codec=self.config.codec, length=self.run.n_params, candidates=entries,
            payload=b"".join(payloads[n] for n in nodes)))
        await asyncio.gather(*(self.nodes.send(Connection(ws=p.ws, remote="", peer=p), data)
                               for p in validators if p.ws is not None))

    async def _exclude(self, node_id: str, digest: str, verdicts: list[Any]) -> None:
        state = self.collection.state
        assert state is not None
        against = [v for v in verdicts if not v.ok]
        reason = against[0].reason + (f" ({len(against)} of {len(verdicts)} validators)"
                                      if len(verdicts) > 1 else "")
        self.collection.exclude(node_id, reason)
        err = UpdateRejected(f"your update for round {state.round} was rejected: {reason}",
                             field="payload")
        self.rejected[err.code] += 1
        self.evidence.record(state.round, node_id, digest, err.code, reason,
                             [v.validator for v in against])
        log.warning("round %d: excluded the update of %s: %s", state.round, node_id[:12],
                    reason)
        peer = self.nodes.peers.get(node_id)
        if peer is not None:
            peer.rejected += 1
            peer.accepted = max(0, peer.accepted - 1)
            peer.state = "rejected"
            conn = self.nodes.conn(node_id)
            if conn is not None:
                await self.nodes.send(conn, Error(
                    code=err.code, message=err.message, field=err.field, round=state.round))
