"""Secure aggregation in a `ws` / `star` run (run config `secagg`): the server relays the key
stages (shared.secagg.round), sums the masked updates and unmasks only their sum.

`SecAggReduction` is the run's reduction strategy (server.reduction chooses it). Per round:

1. `start` (after the RoundOpen went out): once at least max(2, quorum) trainers are
   connected, the invited set is fixed and each gets `open` (the round's public seed, fixed
   point, degree); the key stages follow, each waiting for every invited node still connected
   or `secagg_timeout_s`: adverts -> `roster`; ciphertexts -> relayed; share bundles -> each
   holder's sealed shares. Who masks is fixed from then on; nodes that joined later, or went
   quiet, wait for the next round (`expected` tells the coordinator whom the round waits for).
2. Each trainer sends its masked update as a Submit of codec `secagg`; `vector` checks and adds
   it into the masked sum (shared.secagg.SecAggAggregator.on_masked); bad input is a typed
   error and excludes the sender, before anything is recorded. With `stream_chunk_mb`, a
   larger one streams in and its words join the sum chunk by chunk (server.secagg_stream).
3. `reduce` (the round decided to commit): `unmask` to every submitter still connected, their
   shares back, then the sum is unmasked; the mean of the contributors is the aggregate. Too
   few valid shares (TooManyDropouts) or any other refusal: None, the round is retried with
   fresh keys. A wrong sum is never returned.

Robust rules, validation, stake weights, autotune and worker momentum need individual updates
or change them per node: RunConfig refuses them together with `secagg`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from server.evidence import Evidence
from server.peers import Connection, Nodes
from server.reduction import ServerReduction
from server.runstate import RunState
from shared.errors import BadUpdate, ProtocolError
from shared.messages import SERVER, Ready, SecAgg, Submit
from shared.rounds import RoundState
from shared.secagg import FixedPoint, RoundConfig, SecAggAggregator, SecAggError
from shared.secagg.messages import KeyAdvert, PairCiphertexts, ShareBundle, UnmaskResponse
from shared.secagg.prg import ring_bytes
from shared.secagg.round import (
    SECAGG_CODEC,
    open_body,
    relay_ct_body,
    roster_body,
    shares_body,
    unmask_body,
    unpack_masked,
)

if TYPE_CHECKING:
    from server.collection import RoundCollection
    from server.secagg_stream import MaskedStreams

log = logging.getLogger("server.secagg")
POLL_S = 0.2


class SecAggReduction(ServerReduction):
    """ws / star with secure aggregation: the server only ever holds masked updates."""

    def __init__(self, run: RunState, nodes: Nodes, evidence: Evidence,
                 counters: Counter[str]) -> None:
        super().__init__(run, counters)
        self.nodes, self.evidence = nodes, evidence
        self.trainers: Callable[[], list[str]] = lambda: []  # connected trainers (coordinator)
        self.wake: Callable[[], None] = lambda: None  # the round loop re-decides
        self.agg: SecAggAggregator | None = None
        self.invited: tuple[str, ...] = ()
        self.stage = "idle"  # idle, waiting, advert, ciphertexts, bundle, masking, unmask
        self._task: asyncio.Task[None] | None = None
        self._event = asyncio.Event()
        self.last: dict[str, Any] = {}  # the last unmasked round, for /api/run
        self.streamed: MaskedStreams | None = None  # stream_chunk_mb: server.secagg_stream

    # -- the round's key stages ---------------------------------------------------------
    def start(self, state: RoundState) -> None:
        """A round (or its retry) opened: run the key stages unless they are running or done
        for this round with masked updates in (those stay; retries cannot re-key them)."""
        agg = self.agg
        if agg is not None and agg.cfg.round == state.round and (
                agg.submitted or (self._task is not None and not self._task.done())
                or (self.stage == "masking" and len(self._live(agg.masking)) >= 2)):
            return
        self.cancel()
        self.agg, self.stage = None, "waiting"
        self._task = asyncio.ensure_future(self._keys(state))

    def session(self, node: str, round_: int) -> SecAggReduction:
        """The secure-aggregation session that sums `node`'s masked update for `round_`
        (server.secagg_groups_round: its group's)."""
        return self

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None

    def expected(self, connected: list[str]) -> list[str]:
        """Of the connected trainers, those the open round waits for: once the masking set is
        fixed, only its members (late joiners wait for the next round)."""
        agg = self.agg
        if agg is None or self.stage not in ("masking", "unmask"):
            return connected
        return [n for n in connected if n in agg.masking and n not in agg.excluded]

    def _live(self, nodes: tuple[str, ...] | list[str]) -> list[str]:
        return [n for n in nodes if self.nodes.conn(n) is not None]

    async def _send(self, node: str, round_: int, stage: str, payload: bytes) -> None:
        conn = self.nodes.conn(node)
        if conn is not None:
            await self.nodes.send(conn, SecAgg(run_id=self.run.run_id, round=round_,
                                               node_id=SERVER, stage=stage, payload=payload))

    async def _wait(self, done: Callable[[], bool], timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while not done() and time.monotonic() < end:
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout=POLL_S)

    async def _keys(self, state: RoundState) -> None:
        try:
            await self._key_stages(state)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug, not a node's fault: say so; the round's retry re-keys
            log.exception("round %d: the secure-aggregation key stages failed", state.round)
            self.counters["secagg_key_stage_errors"] += 1
            self.stage, self.agg = "idle", None

    async def _key_stages(self, state: RoundState) -> None:
        cfg = self.config
        need = max(2, cfg.quorum)
        while len(self.trainers()) < need and not state.closed:
            await asyncio.sleep(POLL_S)
        invited = tuple(sorted(self.trainers()))
        rcfg = RoundConfig(run_id=self.run.run_id, round=state.round,
                           seed=secrets.token_bytes(32), dimension=self.run.n_params,
                           fixed_point=FixedPoint.for_sum(cfg.secagg_clip, len(invited)))
        agg = self.agg = SecAggAggregator(rcfg)
        self.invited = invited
        self.stage = "advert"
        for n in invited:
            await self._send(n, state.round, "open", open_body(rcfg))
        await self._wait(lambda: set(self._live(invited)) <= set(agg.adverts) | set(agg.excluded),
                         cfg.secagg_timeout_s)
        if len(agg.adverts) < 2:
            log.warning("round %d: %d key adverts; secure aggregation needs 2 (retried at the "
                        "deadline)", state.round, len(agg.adverts))
            self.stage, self.agg = "idle", None
            return
        adverts = agg.close_roster()
        self.stage = "ciphertexts"
        for a in adverts:
            await self._send(a.node_id, state.round, "roster", roster_body(adverts))
        await self._wait(lambda: set(self._live(agg.roster)) <= set(agg.ciphertexts)
                         | set(agg.excluded), cfg.secagg_timeout_s)
        alive, cts = agg.relay_ciphertexts()
        self.stage = "bundle"
        for n in alive:  # each node gets the ciphertexts addressed to it, not all of them
            mine = [m for m in cts if any(e[0] == n for e in m.entries)]
            await self._send(n, state.round, "ciphertexts", relay_ct_body(alive, mine))
        await self._wait(lambda: set(self._live(agg.keyed)) <= set(agg.bundles)
                         | set(agg.excluded), cfg.secagg_timeout_s)
        alive, routed = agg.relay_shares()
        self.stage = "masking"
        for n in alive:
            await self._send(n, state.round, "shares", shares_body(alive, routed[n]))
        log.info("round %d: secure aggregation keyed among %d of %d invited (excluded %s)",
                 state.round, len(alive), len(invited), sorted(agg.excluded) or "none")
        self.wake()

    async def on_secagg(self, conn: Connection, msg: SecAgg) -> None:
        """A node's key-stage message: checked by the aggregator (a bad one excludes its
        sender and raises the typed error the coordinator sends back)."""
        assert conn.peer is not None
        agg = self.agg
        if msg.node_id != conn.peer.node_id:
            raise BadUpdate("node_id is not the sender's", field="node_id")
        if agg is None or msg.round != agg.cfg.round:
            raise SecAggError(f"no secure-aggregation stage open for round {msg.round}",
                              field="round")
        want = {"advert": "advert", "ciphertexts": "ciphertexts", "bundle": "bundle",
                "unmask": "unmask"}.get(msg.stage)
        if want is None or want != self.stage or (want == "advert"
                                                  and msg.node_id not in self.invited):
            raise SecAggError(f"stage {msg.stage!r} is not expected now (stage {self.stage})",
                              field="stage")
        try:
            data = bytes(msg.payload)
            if want == "advert":
                adv = KeyAdvert.from_json(data)
                if adv.node_id != msg.node_id:
                    raise SecAggError("advert for another node", field="node_id")
                agg.on_advert(adv)
            elif want == "ciphertexts":
                agg.on_ciphertexts(self._own(PairCiphertexts.from_json(data), msg))
            elif want == "bundle":
                agg.on_bundle(self._own(ShareBundle.from_json(data), msg))
            else:
                agg.on_unmask_response(self._own(UnmaskResponse.from_json(data), msg))
        except SecAggError as exc:
            self._count(exc, conn.peer.node_id, agg.cfg.round)
            raise
        finally:
            self._event.set()

    @staticmethod
    def _own(inner: Any, msg: SecAgg) -> Any:
        if inner.node_id != msg.node_id:
            raise SecAggError(f"{type(inner).__name__} of another node", field="node_id")
        return inner

    def _count(self, exc: ProtocolError, node: str, round_: int) -> None:
        self.counters[f"secagg_{exc.code.removeprefix('secagg_')}"] += 1
        log.warning("round %d: secure aggregation refused %s from %s: %s", round_, exc.code,
                    node[:12], exc.message)

    # -- masked updates -----------------------------------------------------------------
    def vector(self, msg: Submit | Ready) -> np.ndarray | None:  # type: ignore[override]
        """Check a masked update and add it into the masked sum; nothing is kept per node."""
        assert isinstance(msg, Submit)
        agg = self.agg
        if msg.codec != SECAGG_CODEC:
            raise BadUpdate(f"this run aggregates securely: codec must be {SECAGG_CODEC!r}",
                            field="codec")
        if agg is None or self.stage != "masking" or msg.round != agg.cfg.round:
            raise SecAggError(f"round {msg.round} takes no masked updates now (stage "
                              f"{self.stage}); keys are set up at the round's start",
                              field="round")
        if self.streamed is not None and self.streamed.take(msg):  # summed as it streamed
            self.wake()
            return None
        try:
            mu = unpack_masked(msg.payload)
            if (mu.node_id, mu.round, mu.run_id) != (msg.node_id, msg.round, msg.run_id):
                raise SecAggError("masked update of another node or round", field="node_id")
            agg.on_masked(mu)
        except SecAggError as exc:
            self._count(exc, msg.node_id, msg.round)
            raise
        self.wake()
        return None

    async def reduce(self, state: RoundState, collection: RoundCollection
                     ) -> np.ndarray | None:
        if self.streamed is not None:  # unfinished streamed masked updates leave the sum
            self.streamed.before_unmask()
        agg = self.agg
        if agg is None or not agg.submitted or set(state.updates) != set(agg.submitted):
            log.warning("round %d: masked updates and the round's updates disagree; retrying",
                        state.round)
            self.agg = None
            return None
        return await self.unmask(state, agg)

    async def unmask(self, state: RoundState, agg: SecAggAggregator) -> np.ndarray | None:
        """Unmask `agg.sum` (the masked updates of `agg.submitted`): the contributors' mean,
        or None (retried with fresh keys). server.secagg_p2p sets the sum from the owners'."""
        self.stage = "unmask"
        req = agg.unmask_request()
        asked = self._live(req.survivors)
        for n in asked:
            await self._send(n, state.round, "unmask", unmask_body(req))
        await self._wait(lambda: set(self._live(asked)) <= set(agg.responses) | set(agg.excluded),
                         self.config.secagg_timeout_s)
        try:
            res = agg.finish()
        except SecAggError as exc:
            self.counters["secagg_unmask_failed"] += 1
            log.warning("round %d: the masked sum cannot be unmasked (%s): retrying with fresh "
                        "keys", state.round, exc.message)
            self.agg, self.stage = None, "idle"
            return None
        for node, code in res.flagged.items():
            self.evidence.record(state.round, node, None, code, "unmask shares failed their "
                                 "commitments", ["server"])
        count = len(res.contributors)
        self.last = {"round": state.round, "contributors": list(res.contributors),
                     "responders": sorted(agg.responses), "excluded": dict(res.excluded),
                     "flagged": dict(res.flagged), "frac_bits": agg.cfg.fixed_point.frac_bits,
                     "sum_sha256": hashlib.sha256(ring_bytes(res.ring_sum)).hexdigest()}
        self.counters["secagg_rounds"] += 1
        self.counters["secagg_dropped_after_submit"] += count - len(agg.responses)
        self.stage = "idle"
        log.info("round %d: unmasked the sum of %d masked updates (%d answered the unmask)",
                 state.round, count, len(agg.responses))
        return np.asarray(np.asarray(res.values, dtype=np.float64) / count, dtype=np.float32)

    def view(self) -> dict[str, Any]:
        return {"stage": self.stage, "invited": len(self.invited),
                "masking": len(self.agg.masking) if self.agg is not None else 0,
                "submitted": len(self.agg.submitted) if self.agg is not None else 0,
                "last": self.last}

