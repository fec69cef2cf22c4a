"""Validation of the round's candidate updates at commit time (the coordinator's part).

Before a round is aggregated, with `validation` on, the server scores every candidate on the
held-out probe set (ml.scoring.ProbeScorer), sends the candidates to every
connected validator node (ValidateRequest) and waits up to `validation_timeout_s` for their
signed Verdicts. shared.validation turns the losses into verdicts and takes the majority.
An excluded update gets an `update_rejected` Error to its sender, a counter, a log line and a
row in the store's `rejections` table (round, node, digest, reason, the validators against it),
and the round is retried if what remains is below quorum.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.scoring import ProbeScorer
from server.peers import Connection, Peer
from shared.errors import BadUpdate, UpdateRejected, WrongRound
from shared.messages import Error, Message, ValidateRequest, Verdict
from shared.rounds import RoundState
from shared.validation import Score, combine, judge, reference, rejected

if TYPE_CHECKING:
    from server.config import RunConfig
    from server.runstate import RunState
    from server.store import UpdateRow

log = logging.getLogger("server.coordinator")


class ValidationMixin:
    """Mixed into server.coordinator.Coordinator, whose state it reads."""

    run: RunState
    config: RunConfig
    state: RoundState | None
    peers: dict[str, Peer]
    rejected: Counter[str]
    counters: Counter[str]
    _updates: dict[str, tuple[np.ndarray, UpdateRow]]
    _payloads: dict[str, bytes]
    _verdicts: dict[str, Verdict]
    _validating: bool
    _scorer: ProbeScorer | None
    _wake: asyncio.Event

    if TYPE_CHECKING:  # the coordinator's methods this mixin calls
        def frame(self, msg: Message) -> bytes: ...

        async def send(self, conn: Connection, msg: Message | bytes) -> None: ...

        def _record(self, round: int | None, node_id: str, digest: str | None, code: str,
                    reason: str, validators: list[str]) -> None: ...

    def _on_verdict(self, conn: Connection, msg: Verdict) -> None:
        peer = conn.peer
        assert peer is not None
        if peer.role != "validator":
            raise BadUpdate("only nodes that joined as validators send verdicts",
                            field="node_id")
        if not self._validating or self.state is None or msg.round != self.state.round:
            raise WrongRound(f"no validation is pending for round {msg.round}", field="round")
        self._verdicts[peer.node_id] = msg
        self.counters["verdicts"] += 1
        self._wake.set()

    async def _validate(self) -> None:
        """Score the round's candidates (server + connected validator nodes), exclude the
        ones a majority rejects: typed error to the sender, a counter, a recorded reason."""
        state = self.state
        assert state is not None
        cfg, loop = self.config, asyncio.get_running_loop()
        nodes = [n for n in sorted(state.updates) if n in self._updates]
        if not nodes:
            return
        validators = [p for p in self.peers.values()
                      if p.ws is not None and p.role == "validator"]
        self._verdicts, self._validating = {}, True
        try:
            if validators:
                await self._request_verdicts(nodes, validators)
            if self._scorer is None:
                self._scorer = ProbeScorer(self.run.work, cfg.validation_samples)
            base, losses = await asyncio.to_thread(
                self._scorer.score, self.run.params, [self._updates[n][0] for n in nodes])
            ref = reference(base, losses)
            verdicts = [judge(ref=ref, threshold=cfg.validation_threshold,
                              score=Score(node_id=n, digest=state.updates[n], loss=loss))
                        for n, loss in zip(nodes, losses, strict=True)]
            until = loop.time() + cfg.validation_timeout_s
            while len(self._verdicts) < len(validators) and loop.time() < until:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=until - loop.time())
            for vid, v in self._verdicts.items():
                got = {(s["node_id"], s["digest"]): s["loss"] for s in v.scores}
                vref = reference(v.base_loss, got.values())
                verdicts += [judge(ref=vref, threshold=cfg.validation_threshold,
                                   validator=vid, score=Score(node_id=n, digest=state.updates[n],
                                                              loss=got[(n, state.updates[n])]))
                             for n in nodes if (n, state.updates[n]) in got]
        finally:
            self._validating = False
        for (node_id, digest), vs in combine(verdicts).items():
            if rejected(vs):
                await self._exclude(node_id, digest, vs)

    async def _request_verdicts(self, nodes: list[str], validators: list[Peer]) -> None:
        state = self.state
        assert state is not None
        entries, offset = [], 0
        for n in nodes:
            size = len(self._payloads[n])
            entries.append({"node_id": n, "digest": state.updates[n], "offset": offset,
                            "size": size})
            offset += size
        data = self.frame(ValidateRequest(
            run_id=self.run.run_id, round=state.round, params_digest=self.run.params_digest,
            codec=self.config.codec, length=self.run.n_params, candidates=entries,
            payload=b"".join(self._payloads[n] for n in nodes)))
        await asyncio.gather(*(self.send(Connection(ws=p.ws, remote="", peer=p), data)
                               for p in validators if p.ws is not None))

    async def _exclude(self, node_id: str, digest: str, verdicts: list[Any]) -> None:
        state = self.state
        assert state is not None
        against = [v for v in verdicts if not v.ok]
        reason = against[0].reason + (f" ({len(against)} of {len(verdicts)} validators)"
                                      if len(verdicts) > 1 else "")
        state.exclude(node_id, reason)
        self._updates.pop(node_id, None)
        self._payloads.pop(node_id, None)
        err = UpdateRejected(f"your update for round {state.round} was rejected: {reason}",
                             field="payload")
        self.rejected[err.code] += 1
        self._record(state.round, node_id, digest, err.code, reason,
                     [v.validator for v in against])
        log.warning("round %d: excluded the update of %s: %s", state.round, node_id[:12],
                    reason)
        peer = self.peers.get(node_id)
        if peer is not None:
            peer.rejected += 1
            peer.accepted = max(0, peer.accepted - 1)
            peer.state = "rejected"
            if peer.ws is not None:
                await self.send(Connection(ws=peer.ws, remote="", peer=peer), Error(
                    code=err.code, message=err.message, field=err.field, round=state.round))

