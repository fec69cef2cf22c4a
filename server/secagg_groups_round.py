"""Secure and robust in a live `ws` / `star` run (run config `secagg` with `secagg_groups`):
secure aggregation inside groups of trainers, the run's robust rule over the group means.

`SecAggGroupsReduction` is the run's reduction strategy (server.reduction chooses it). Per
round:

1. `start`: once at least max(2, quorum) trainers are connected, the server draws the round's
   public group seed and places the connected trainers in groups with
   shared.secagg.groups.assign (SHA-256 of seed and node id: nobody picks its group). The
   number of groups is `secagg_groups`, or with -1 ("auto") groups.group_count for
   `byzantine_fraction`, capped so that every group keeps >= groups.MIN_SIZE members.
2. Each group is an independent secure-aggregation session: one `GroupSession` (a
   server.secagg_round.SecAggReduction restricted to the group's members) with its own
   RoundConfig and seed, its own SecAggAggregator, key stages, dropouts and unmask. A node
   sees one ordinary session (the participant needs no change). Each SecAgg message and each
   masked Submit goes to the session of its sender's group.
3. `reduce` (the round decided to commit): every group with masked updates is unmasked
   concurrently; its mean is one input of the run's rule (median, trimmed mean, centered
   clipping, or mean), combined with groups.combine. A group that fails to unmask, or that
   sent nothing, is left out (logged, counted `secagg_group_failed`) while more than half of
   the round's groups are left; otherwise the round is retried with fresh groups and keys.
   With `validation`, each unmasked group mean is scored on the server's held-out probe and
   groups.validate drops the ones that fail (validation at group level; validator nodes are
   not asked: they would see a group's mean).

The server sees each group's sum, never one node's update: privacy holds at group level, and
robustness while attackers hold fewer than half the groups (docs/secagg_groups.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import secrets
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from ml.scoring import ProbeScorer
from server.evidence import Evidence
from server.peers import Connection, Nodes
from server.runstate import RunState
from server.secagg_round import POLL_S, SecAggReduction
from shared.errors import BadUpdate
from shared.messages import Ready, SecAgg, Submit
from shared.outer import history_reference
from shared.rounds import RoundState
from shared.secagg import SecAggError
from shared.secagg import groups as G

if TYPE_CHECKING:
    from server.collection import RoundCollection

log = logging.getLogger("server.secagg")


class GroupSession(SecAggReduction):
    """One group's secure-aggregation session: the base engine, its trainers limited to the
    group's members (its key stages start once two of them are connected)."""

    def __init__(self, outer: SecAggGroupsReduction, index: int,
                 members: tuple[str, ...]) -> None:
        super().__init__(outer.run, outer.nodes, outer.evidence, outer.counters)
        self.config = dataclasses.replace(outer.config, quorum=1)  # need = 2 members
        self.index, self.members = index, members
        self.trainers = lambda: [n for n in outer.trainers() if n in members]
        self.wake = lambda: outer.wake()
        self.streamed = outer.streamed  # streamed masked updates (server.secagg_stream)


class SecAggGroupsReduction(SecAggReduction):
    """ws / star, secure and robust: one secure-aggregation session per group of trainers."""

    def __init__(self, run: RunState, nodes: Nodes, evidence: Evidence,
                 counters: Counter[str]) -> None:
        super().__init__(run, nodes, evidence, counters)
        self.sessions: list[GroupSession] = []
        self.round = -1
        self.seed = b""
        self.of: dict[str, GroupSession] = {}  # node id -> its group's session
        self._scorer: ProbeScorer | None = None  # validation at group level

    # -- groups and their key stages -------------------------------------------------------
    def start(self, state: RoundState) -> None:
        """A round (or its retry) opened: keep this round's groups while any of them keyed or
        holds masked updates (the others re-key among their members); else draw new ones."""
        if self.round == state.round and (self._setup_running() or any(
                s.agg is not None or (s._task is not None and not s._task.done())
                for s in self.sessions)):
            for s in self.sessions:
                s.start(state)
            return
        self.cancel()
        self.sessions, self.of, self.round, self.stage = [], {}, state.round, "waiting"
        self._task = asyncio.ensure_future(self._assign(state))

    def _setup_running(self) -> bool:
        return self._task is not None and not self._task.done()

    def cancel(self) -> None:
        super().cancel()
        for s in self.sessions:
            s.cancel()

    def group_count(self, n: int) -> int:
        """The round's number of groups for `n` trainers (configured or "auto"), capped so
        that each group keeps groups.MIN_SIZE members (one group below 2 * MIN_SIZE)."""
        want = self.config.secagg_groups
        if want < 0:
            want = G.group_count(n, min(self.config.byzantine_fraction, 0.49))
        return max(1, min(want, n // G.MIN_SIZE))

    async def _assign(self, state: RoundState) -> None:
        need = max(2, self.config.quorum)
        while len(self.trainers()) < need and not state.closed:
            await asyncio.sleep(POLL_S)
        invited = tuple(sorted(self.trainers()))
        count = self.group_count(len(invited))
        if count < max(1, self.config.secagg_groups):
            self.counters["secagg_groups_capped"] += 1
            log.warning("round %d: %d trainers make %d groups of >= %d (secagg_groups %d)",
                        state.round, len(invited), count, G.MIN_SIZE, self.config.secagg_groups)
        self.seed = secrets.token_bytes(32)
        self.invited = invited
        self.sessions = [GroupSession(self, i, members)
                         for i, members in enumerate(G.assign(self.seed, invited, count))]
        self.of = {n: s for s in self.sessions for n in s.members}
        self.stage = "grouped"
        log.info("round %d: %d trainers in %d secure-aggregation groups (sizes %s)",
                 state.round, len(invited), count, [len(s.members) for s in self.sessions])
        for s in self.sessions:
            s.start(state)
        self.wake()

    def expected(self, connected: list[str]) -> list[str]:
        """Whom the round waits for: before the groups are drawn every connected trainer;
        then each group's (its masking set once keyed); late joiners wait for the next."""
        if not self.sessions:
            return connected
        out: list[str] = []
        for s in self.sessions:
            out += s.expected([n for n in connected if n in s.members])
        return out

    def session(self, node: str, round_: int) -> SecAggReduction:
        return self._session(node, round_)

    def _session(self, node: str, round_: int) -> GroupSession:
        s = self.of.get(node)
        if s is None or round_ != self.round:
            self.counters["secagg_no_group"] += 1
            raise SecAggError(f"no secure-aggregation group of {node[:12]} in round {round_}",
                              field="round")
        return s

    async def on_secagg(self, conn: Connection, msg: SecAgg) -> None:
        assert conn.peer is not None
        if msg.node_id != conn.peer.node_id:
            raise BadUpdate("node_id is not the sender's", field="node_id")
        await self._session(msg.node_id, msg.round).on_secagg(conn, msg)

    def vector(self, msg: Submit | Ready) -> np.ndarray | None:  # type: ignore[override]
        assert isinstance(msg, Submit)
        return self._session(msg.node_id, msg.round).vector(msg)

    # -- the commit: unmask each group, the robust rule over their means -------------------
    async def reduce(self, state: RoundState, collection: RoundCollection
                     ) -> np.ndarray | None:
        if self.streamed is not None:  # unfinished streamed masked updates leave the sums
            self.streamed.before_unmask()
        submitted = {n for s in self.sessions if s.agg is not None for n in s.agg.submitted}
        if not submitted or set(state.updates) != submitted:
            log.warning("round %d: masked updates and the round's updates disagree; retrying",
                        state.round)
            self._reset()
            return None
        self.stage = "unmask"
        live = [s for s in self.sessions if s.agg is not None and s.agg.submitted]
        means = await asyncio.gather(*(s.unmask(state, s.agg) for s in live
                                       if s.agg is not None))
        got = {s.index: m for s, m in zip(live, means, strict=True) if m is not None}
        tried = {s.index for s in live}
        status = [self._status(s, got, tried) for s in self.sessions]
        left_out = [st["index"] for st in status if st["status"] != "ok"]
        self.counters["secagg_group_failed"] += len(left_out)
        for i in left_out:
            log.warning("round %d: group %d is left out (%s)", state.round, i,
                        status[i]["status"])
        total = len(self.sessions)
        if 2 * len(got) <= total:
            self.counters["secagg_groups_retried"] += 1
            log.warning("round %d: %d of %d groups unmasked, not more than half: retrying "
                        "with fresh groups and keys", state.round, len(got), total)
            self.last = {"round": state.round, "seed": self.seed.hex(), "groups": status,
                         "combined": [], "left_out": left_out, "committed": False}
            self._reset()
            return None
        if self.config.validation:
            left_out = sorted(left_out + await self._validate(state, got, status))
        if not got:
            self.counters["secagg_groups_retried"] += 1
            log.warning("round %d: validation rejected every group mean: retrying",
                        state.round)
            self.last = {"round": state.round, "seed": self.seed.hex(), "groups": status,
                         "combined": [], "left_out": left_out, "committed": False}
            self._reset()
            return None
        agg = self._combine(state, got, total)
        self.last = {"round": state.round, "seed": self.seed.hex(), "groups": status,
                     "combined": sorted(got), "left_out": left_out, "committed": True,
                     "rule": self.config.aggregator}
        self.counters["secagg_group_rounds"] += 1
        self.stage = "idle"
        return agg

    async def _validate(self, state: RoundState, got: dict[int, np.ndarray],
                        status: list[dict[str, Any]]) -> list[int]:
        """Validation at group level: each group mean scored on the server's held-out probe
        (ml.scoring.ProbeScorer); groups.validate drops a mean whose loss exceeds
        max(base, median) by more than `validation_threshold` (removed from `got`; returned)."""
        if self._scorer is None:
            self._scorer = ProbeScorer(self.run.work, self.config.validation_samples)
        idx = sorted(got)
        base, losses = await asyncio.to_thread(self._scorer.score, self.run.params,
                                               [got[i] for i in idx])
        keep = G.validate(base, losses, threshold=self.config.validation_threshold)
        rejected = [i for i, ok in zip(idx, keep, strict=True) if not ok]
        for i, loss, ok in zip(idx, losses, keep, strict=True):
            status[i]["loss"] = loss
            if not ok:
                del got[i]
                status[i]["status"] = "rejected by validation"
                self.counters["secagg_group_rejected"] += 1
                log.warning("round %d: group %d's mean fails validation (held-out loss %s, "
                            "base %s): left out", state.round, i, loss, base)
        return rejected

    def _combine(self, state: RoundState, got: dict[int, np.ndarray], total: int
                 ) -> np.ndarray:
        cfg = self.config
        # each GroupSession returns its group's mean: a sum of one "update" keeps it exact
        sums = [G.GroupSum(index=i, total=got[i], count=1) for i in sorted(got)]
        # every attacker node may spoil one group; combine clamps f to what the rule bears
        attackers = math.floor(len(state.updates) * cfg.byzantine_fraction)
        f = min(attackers, G.tolerated(len(sums)))
        if attackers > f:
            self.counters["f_clamped"] += 1
        params = dict(cfg.aggregator_params)
        if cfg.aggregator == "centered-clipping" and cfg.cc_reference == "history":
            params["reference"] = history_reference(self.run.momentum, cfg.outer_momentum)
        log.info("round %d: %s over %d of %d group means (f=%d)", state.round, cfg.aggregator,
                 len(sums), total, f)
        return np.asarray(G.combine(sums, rule=cfg.aggregator, f=f, **params),
                          dtype=np.float32)

    @staticmethod
    def _status(s: GroupSession, got: dict[int, np.ndarray], tried: set[int]
                ) -> dict[str, Any]:
        st: dict[str, Any] = {"index": s.index, "members": list(s.members)}
        if s.index in got:
            st.update(status="ok", **{k: s.last[k] for k in (
                "contributors", "responders", "excluded", "flagged", "frac_bits",
                "sum_sha256")})
        else:
            st["status"] = "unmask failed" if s.index in tried else "no masked updates"
        return st

    def _reset(self) -> None:
        self.cancel()
        self.sessions, self.of, self.round, self.stage = [], {}, -1, "idle"

    def view(self) -> dict[str, Any]:
        keyed = bool(self.sessions) and all(s.stage == "masking" for s in self.sessions)
        return {"stage": "masking" if keyed else self.stage, "invited": len(self.invited),
                "groups": [{"index": s.index, "members": len(s.members), "stage": s.stage,
                            "masking": len(s.agg.masking) if s.agg is not None else 0,
                            "submitted": len(s.agg.submitted) if s.agg is not None else 0}
                           for s in self.sessions],
                "masking": sum(len(s.agg.masking) for s in self.sessions if s.agg is not None),
                "submitted": sum(len(s.agg.submitted) for s in self.sessions
                                 if s.agg is not None),
                "last": self.last}
