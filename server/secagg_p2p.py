"""Secure aggregation in a `p2p` run (run config `secagg` with `transport = "p2p"`).

The key stages are those of a star run (server.secagg_round.SecAggReduction, which this class
extends: the coordinator wires it the same way). Then, per round:

1. Each member masks its fixed-point update (shared.secagg.round), keeps the masked words and
   sends a `Ready` (shared.secagg.p2p.masked_ready); `vector` takes it from members of the
   round's masking set only.
2. When the round would commit, the p2p reduction of server.p2p runs with rule
   `secagg-sum`: members send slices of their MASKED words to the shards' owners, owners add
   them in Z_2^32 and upload the ring sums; the two owners of a shard are compared by digest
   (shared.secagg.p2p.SecAggShardCheck), a member or owner that leaves is dropped from the
   plan as in any p2p round (its update is then out of the sum and its pair masks come off at
   the unmask).
3. The agreed shards are the masked sum of the final plan's members; it is unmasked with the
   seeds the survivors' shares recover, exactly as in star (SecAggReduction.unmask).

Members cannot compute the outer step themselves (they hold no unmasked aggregate), so every
trainer's next RoundOpen carries the params and the outer momentum (`full+m`): server bytes
per member and round 8 x n_params, as much as a star run's downlink, instead of p2p's short
outer step. Browser tabs are members and owners like native nodes (browser/node/p2p_glue.py,
their ring sum in JS).
"""

from __future__ import annotations

import base64
import logging
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from server.evidence import Evidence
from server.p2p import P2PReduction
from server.peers import Connection, Nodes, Peer
from server.runstate import RunState
from server.secagg_round import SecAggReduction
from shared.errors import BadUpdate, ProtocolError
from shared.messages import SERVER, Hello, Ready, SecAgg, Shard, Submit
from shared.p2p import Plan
from shared.rounds import RoundState
from shared.secagg import SecAggAggregator, SecAggError
from shared.secagg.p2p import (
    ACCUSE_STAGE,
    SECAGG_RULE,
    BadMaskedSlice,
    SecAggShardCheck,
    check_accusation,
    check_slice,
)
from shared.secagg.prg import ring_from_bytes

if TYPE_CHECKING:
    from server.collection import RoundCollection

log = logging.getLogger("server.secagg")


class SecAggP2PReduction(SecAggReduction):
    """p2p with secure aggregation: owners sum masked shards, the server unmasks the sum."""

    update_type: type[Submit] | type[Ready] = Ready
    wrong_update = "this run reduces masked updates peer to peer: send Ready, not the update"

    def __init__(self, run: RunState, nodes: Nodes, evidence: Evidence,
                 counters: Counter[str]) -> None:
        super().__init__(run, nodes, evidence, counters)
        self.p2p = P2PReduction(run, nodes, evidence, counters)
        self.p2p.rule, self.p2p.result_codec = SECAGG_RULE, "raw32"
        self.p2p.make_check = self._make_check
        self.check: SecAggShardCheck | None = None  # the running reduction's check

    def _make_check(self, plan: Plan) -> SecAggShardCheck:
        self.check = SecAggShardCheck(plan)
        return self.check

    @property
    def busy(self) -> bool:  # type: ignore[override]
        return self.p2p.busy

    def on_join(self, hello: Hello) -> str:
        return self.p2p.on_join(hello)  # tabs too: browser/node/p2p_glue.py's TabSecAggReducer

    def open_kind(self, peer: Peer, holds_prev: bool) -> str | None:
        return "full+m" if peer.role == "trainer" else None  # members hold no aggregate

    async def on_shard(self, conn: Connection, msg: Shard) -> None:
        """A relayed masked slice is checked here (the server knows the plan); one of the
        wrong length is refused and its sender ejected from the round."""
        red = self.p2p._p2p
        if red is not None and msg.to != SERVER and msg.kind == "part" \
                and msg.round == red[0].round and 0 <= msg.shard < red[0].n_shards:
            try:
                check_slice(red[0], msg.shard, bytes(msg.payload), msg.node_id)
            except BadMaskedSlice as exc:
                self._eject(msg.node_id, exc, "server")
                raise
        await self.p2p.on_shard(conn, msg)

    async def on_secagg(self, conn: Connection, msg: SecAgg) -> None:
        """Key stages as in star, and owners' accusations: a member's signed slice of the
        wrong length (shared.secagg.p2p.check_accusation) ejects that member."""
        if msg.stage != ACCUSE_STAGE:
            await super().on_secagg(conn, msg)
            return
        assert conn.peer is not None
        agg, red = self.agg, self.p2p._p2p
        if msg.node_id != conn.peer.node_id:
            raise BadUpdate("node_id is not the sender's", field="node_id")
        if agg is None or red is None or msg.round != red[0].round:
            raise SecAggError("no secure p2p reduction is running for that round",
                              field="round")
        plan = red[0]
        slice_frame = bytes(msg.payload)
        sender, key = self._signing_key(agg, slice_frame)
        if sender in self.p2p.ejected:
            return  # another owner's accusation was first
        accused = check_accusation(slice_frame, run_id=self.run.run_id, round_=plan.round,
                                   accuser=msg.node_id, plan=plan, signing_key=key)
        self._eject(accused, BadMaskedSlice("a masked slice of the wrong length",
                                            field="payload"), msg.node_id)

    @staticmethod
    def _signing_key(agg: SecAggAggregator, frame: bytes) -> tuple[str, bytes]:
        from shared.messages import decode_message

        try:
            part = decode_message(frame, max_payload=len(frame) + 1024)
        except ProtocolError as exc:
            raise SecAggError(f"accusation frame: {exc}", field="payload") from None
        if not isinstance(part, Shard):
            raise SecAggError("accusation frame: not a Shard", field="payload")
        sender = part.node_id
        adv = agg.adverts.get(sender)
        if adv is None:
            raise SecAggError("the accused is not in this round's roster", field="payload")
        return sender, base64.b64decode(adv.signing_key)

    def _eject(self, node: str, exc: SecAggError, by: str) -> None:
        agg = self.agg
        if agg is None or node in self.p2p.ejected:
            return
        agg.excluded[node] = exc.code
        self.p2p.ejected.add(node)
        self._count(exc, node, agg.cfg.round)
        self.evidence.record(agg.cfg.round, node, None, exc.code, exc.message, [by])
        self.p2p._event.set()

    def vector(self, msg: Submit | Ready) -> np.ndarray | None:  # type: ignore[override]
        """A member's Ready for its masked update: from the masking set of this round only."""
        agg = self.agg
        if not isinstance(msg, Ready):
            raise BadUpdate(self.wrong_update, field="msg_type")
        if agg is None or self.stage != "masking" or msg.round != agg.cfg.round:
            raise SecAggError(f"round {msg.round} takes no masked updates now (stage "
                              f"{self.stage}); keys are set up at the round's start",
                              field="round")
        if msg.node_id not in agg.masking or msg.node_id in agg.excluded:
            raise SecAggError("not in this round's masking set", field="node_id")
        self.wake()
        return None

    async def reduce(self, state: RoundState, collection: RoundCollection
                     ) -> np.ndarray | None:
        agg = self.agg
        if agg is None or self.stage != "masking" or not set(state.updates) <= set(agg.masking):
            log.warning("round %d: the Readys are not this round's masking set; retrying",
                        state.round)
            self.agg, self.stage = None, "idle"
            return None
        self.check = None
        out = await self.p2p.reduce(state, collection)
        check = self.check
        if out is None or check is None or not check.done:
            self.agg, self.stage = None, "idle"
            return None
        members = check.plan.members
        if not set(members) <= set(agg.masking):  # make_plan takes the round's updates only
            self.agg, self.stage = None, "idle"
            return None
        agg.sum = ring_from_bytes(check.ring())
        agg.submitted = sorted(members)
        self.counters["secagg_p2p_rounds"] += 1
        return await self.unmask(state, agg)
