"""The round coordinator: peers, the open round, aggregation, the outer step and commits.

I/O-free decisions live in shared.rounds; this class wires them to WebSocket peers, the
store and the evaluator. One instance per server process, kept in the app state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import numpy as np

from ml.scoring import ProbeScorer
from server.auth import authenticate
from server.config import RunConfig
from server.p2p import P2PMixin
from server.peers import Connection, Peer
from server.rtc import RtcHub
from server.runstate import RunState
from server.store import UpdateRow
from server.validation import ValidationMixin
from shared.aggregation import estimate_f, get_rule
from shared.codecs import decode_update
from shared.downlink import encode_outer_step
from shared.envelope import ReplayGuard, sign_round
from shared.errors import (
    BadUpdate,
    FrameTooLarge,
    ProtocolError,
    StaleUpdate,
)
from shared.frame import PROTOCOL_VERSION, decode_frame
from shared.messages import (
    Ack,
    Challenge,
    Error,
    Hello,
    Message,
    Ready,
    RoundCommitted,
    RoundOpen,
    Shard,
    Signal,
    Submit,
    Verdict,
    Welcome,
    message_from_frame,
)
from shared.outer import OuterConfig, history_reference, outer_step
from shared.p2p import Plan, ShardCheck
from shared.rounds import Decision, Outcome, RoundPolicy, RoundState

log = logging.getLogger("server.coordinator")
AGENT = "daa-prime-server/0.1"
MAX_ERRORS_PER_CONNECTION = 256  # then the connection is closed (every Error is signed)


CommitHook = Callable[[dict[str, Any]], Awaitable[None] | None]


class Coordinator(ValidationMixin, P2PMixin):
    def __init__(self, run: RunState) -> None:
        self.run = run
        self.config: RunConfig = run.config
        self.peers: dict[str, Peer] = {}
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.commit_hooks: list[CommitHook] = []
        self.state: RoundState | None = None
        self.finished = False
        self._updates: dict[str, tuple[np.ndarray, UpdateRow]] = {}
        self._payloads: dict[str, bytes] = {}  # encoded updates, for validator nodes
        self._verdicts: dict[str, Verdict] = {}  # validator node id -> its verdict this round
        self._validating = False
        self._scorer: ProbeScorer | None = None
        self._round_bytes = [0, 0]  # up, down during the open round
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Future[Any]] = set()
        self.error: BaseException | None = None  # why the round loop died, if it did
        self.replays = ReplayGuard()
        self.rtc = RtcHub(self)
        self._p2p: tuple[Plan, ShardCheck] | None = None  # the running p2p reduction
        self._p2p_event = asyncio.Event()
        self._p2p_members: frozenset[str] = frozenset()
        self._p2p_liars: set[str] = set()
        self.max_payload = min(self.config.max_frame, 4 * run.n_params + 4096)

    # -- sending -------------------------------------------------------------------------
    def frame(self, msg: Message) -> bytes:
        """`msg` signed with the server's key (shared.envelope)."""
        ident = self.run.identity
        assert ident is not None
        return msg.to_frame(sign=ident.signer(
            run_id=self.run.run_id, round=sign_round(getattr(msg, "round", None)),
            msg_type=msg.TYPE, nonce=msg.nonce))  # type: ignore[attr-defined]

    async def send(self, conn: Connection, msg: Message | bytes) -> None:
        data = msg if isinstance(msg, bytes) else self.frame(msg)
        if conn.peer is not None:
            conn.peer.bytes_down += len(data)
        self._round_bytes[1] += len(data)
        self.counters["bytes_down"] += len(data)
        try:
            await conn.ws.send_bytes(data)
        except (ConnectionError, RuntimeError) as exc:
            log.info("send to %s failed: %s", conn.remote, exc)

    async def reject(self, conn: Connection, err: ProtocolError, round: int | None = None) -> None:
        """Typed error to the sender, a log line, a counter. Nothing else changes."""
        self.rejected[err.code] += 1
        who = conn.peer.node_id[:12] if conn.peer else conn.remote
        if conn.peer is not None:
            conn.peer.rejected += 1
            self._record(round, conn.peer.node_id, None, err.code, err.message, ["server"])
        log.warning("rejected %s from %s: %s", err.code, who, err.message)
        conn.errors += 1
        if conn.errors > MAX_ERRORS_PER_CONNECTION:
            log.warning("closing %s after %d refused frames", who, conn.errors - 1)
            self._background(conn.ws.close())
            return
        await self.send(conn, Error(code=err.code, message=err.message, field=err.field,
                                    round=round))

    # -- receiving -----------------------------------------------------------------------
    async def greet(self, conn: Connection) -> None:
        """First frame on a new connection: the challenge its Hello must sign."""
        ident = self.run.identity
        assert ident is not None
        await self.send(conn, Challenge(run_id=self.run.run_id, challenge=conn.challenge,
                                        server_public_key=ident.public_key.hex(),
                                        protocol_version=PROTOCOL_VERSION, agent=AGENT))

    async def handle_frame(self, conn: Connection, data: bytes) -> None:
        conn.bytes_up += len(data)
        self._round_bytes[0] += len(data)
        self.counters["bytes_up"] += len(data)
        if conn.peer is not None:
            conn.peer.bytes_up += len(data)
            conn.peer.last_seen = time.time()
        round_: int | None = None
        try:
            frame = decode_frame(data, max_payload=self.max_payload)
            round_ = frame.header.get("round") if isinstance(frame.header.get("round"),
                                                             int) else None
            # signature + replay checks BEFORE the payload is inflated or decoded
            node_id, nonce, key = authenticate(
                frame, run_id=self.run.run_id, challenge=conn.challenge,
                peer_id=conn.peer.node_id if conn.peer else None, peer_key=conn.public_key)
            self.replays.check_and_remember(node_id, nonce)
            if frame.msg_type == Hello.TYPE:
                conn.public_key = key
            msg = message_from_frame(frame, max_payload=self.max_payload)
            if isinstance(msg, Hello):
                await self._on_hello(conn, msg)
            elif isinstance(msg, Submit):
                await self._on_submit(conn, msg)
            elif isinstance(msg, Verdict):
                self._on_verdict(conn, msg)
            elif isinstance(msg, Signal):
                await self.rtc.on_signal(conn, msg)
            elif isinstance(msg, Ready):
                await self._on_ready(conn, msg)
            elif isinstance(msg, Shard):
                await self._on_shard(conn, msg)
        except ProtocolError as err:
            await self.reject(conn, err, round_)
        except Exception:  # a bug, not the peer's fault: keep serving, say so, count it
            log.exception("internal error handling a frame from %s", conn.remote)
            await self.reject(conn, ProtocolError("internal server error; see the server log"))

    async def oversized(self, conn: Connection) -> None:
        """The transport refused a message above its limit (the socket is closing)."""
        err = FrameTooLarge(f"message exceeds the {self.config.max_frame} byte limit")
        self.rejected[err.code] += 1
        log.warning("rejected %s from %s: %s", err.code, conn.remote, err.message)

    async def _on_hello(self, conn: Connection, msg: Hello) -> None:
        if (self.config.transport == "p2p" and msg.runtime == "browser"
                and msg.role == "trainer"):
            raise BadUpdate("this run reduces peer to peer (transport p2p), which browser "
                            "tabs cannot join yet; run `python -m native_node join`",
                            field="runtime")
        old = self.peers.get(msg.node_id)
        if old is not None and old.ws is not None:
            log.info("node %s reconnected; closing its previous connection", msg.node_id[:12])
            self._background(old.ws.close())  # a dead peer's close may take seconds
        shard = self.run.store.shard_for(msg.node_id, msg.runtime, self.config.n_shards)
        peer = Peer(node_id=msg.node_id, runtime=msg.runtime, device=msg.device, shard=shard,
                    ws=conn.ws, role=msg.role,
                    features=frozenset(f for f in msg.features.split(",") if f))
        if old is not None:
            peer.first_seen, peer.bytes_up, peer.bytes_down = (old.first_seen, old.bytes_up,
                                                               old.bytes_down)
            peer.accepted, peer.rejected = old.accepted, old.rejected
        peer.bytes_up += conn.bytes_up
        if self.config.transport == "p2p" and msg.role == "trainer":
            peer.transport = "p2p"  # "p2p-relayed" once the server forwards shards for it
        self.peers[msg.node_id] = peer
        conn.peer = peer
        log.info("node %s joined as %s (%s, %s, shard %d)", msg.node_id[:12], msg.role,
                 msg.runtime, msg.device, shard)
        run = self.run
        await self.send(conn, Welcome(
            run_id=run.run_id, node_id=msg.node_id, model=run.work.model_config,
            model_id=run.work.model_id, data=run.work.data_spec.to_dict(), shard=shard,
            n_shards=self.config.n_shards, codec=self.config.codec,
            codec_params=self.config.codec_params, error_feedback=self.config.error_feedback,
            n_params=run.n_params, transport=self.config.transport,
            rtc_timeout_s=self.config.rtc_timeout_s, worker_momentum=self.config.worker_momentum))
        if self.finished:
            await self.send(conn, self._committed_msg(final=True))
        elif self.state is not None and not self.state.closed:
            await self._send_open(conn)
        self._wake.set()

    async def _on_submit(self, conn: Connection, msg: Submit) -> None:
        peer = conn.peer
        assert peer is not None  # _authenticate made sure
        state = self.state
        if state is None:
            raise BadUpdate("no round is open", field="round")
        if peer.role != "trainer":
            raise BadUpdate(f"a {peer.role} does not submit updates", field="node_id")
        if self.config.transport == "p2p":
            raise BadUpdate("this run reduces peer to peer: send Ready, not the update",
                            field="msg_type")
        if msg.codec != self.config.codec:
            raise BadUpdate(f"codec {msg.codec!r} is not this run's codec "
                            f"{self.config.codec!r}", field="codec")
        if msg.length != self.run.n_params:
            raise BadUpdate(f"wrong shape: update has {msg.length} values, the model has "
                            f"{self.run.n_params}", field="length")
        weight = 1.0
        if msg.round < state.round:
            weight = self._stale_weight(peer, msg.round, state.round)
        as_round = state.round if weight != 1.0 else msg.round
        outcome = state.check(node_id=peer.node_id, round=as_round, digest=msg.digest)
        if outcome is Outcome.ACCEPTED:
            vec = decode_update(msg.payload, msg.length, expect=msg.codec,
                                layout=self.run.work.manifest)
            if weight != 1.0:
                vec = np.asarray(vec, dtype=np.float32) * np.float32(weight)
                self.counters["stale_applied"] += 1
                log.info("late update from %s for round %d applied to round %d with weight "
                         "%.3g", peer.node_id[:12], msg.round, state.round, weight)
            state.submit(node_id=peer.node_id, round=as_round, digest=msg.digest)
            self._payloads[peer.node_id] = msg.payload
            self._updates[peer.node_id] = (np.asarray(vec, dtype=np.float32), UpdateRow(
                node_id=peer.node_id, digest=msg.digest, bytes=len(msg.payload),
                train_loss=msg.train_loss, samples=msg.samples, compute_s=msg.compute_s))
        if outcome is Outcome.ACCEPTED:
            peer.accepted += 1
            peer.state = "submitted"
            self.counters["accepted"] += 1
        else:
            self.counters["duplicates"] += 1
            log.info("duplicate update from %s for round %d (counted once)",
                     peer.node_id[:12], msg.round)
        await self.send(conn, Ack(round=msg.round, digest=msg.digest, status=outcome.value))
        self._wake.set()

    def _stale_weight(self, peer: Peer, round: int, current: int) -> float:
        """Weight of a late update for `round` (< current) under the stale policy, or
        StaleUpdate (counted) when the policy drops it."""
        age = current - round
        cfg = self.config
        if cfg.stale_policy == "weight" and age <= cfg.max_staleness:
            return float(cfg.stale_weight ** age)
        self.counters["stale_dropped"] += 1
        why = ("the run drops late updates (stale_policy drop)" if cfg.stale_policy == "drop"
               else f"it is {age} rounds old (max_staleness {cfg.max_staleness})")
        raise StaleUpdate(f"round {round} was already committed; the current round is "
                          f"{current}; {why}", field="round")

    def disconnect(self, conn: Connection) -> None:
        peer = conn.peer
        if peer is not None and peer.ws is conn.ws:
            peer.ws = None
            peer.state = "gone"
            log.info("node %s left", peer.node_id[:12])
            self._background(self.rtc.close(peer.node_id))
            self._wake.set()

    # -- rounds --------------------------------------------------------------------------
    def _active(self) -> list[str]:
        """Connected trainers: the participants a round waits for."""
        return [p.node_id for p in self.peers.values()
                if p.ws is not None and p.role == "trainer"]

    def _open_frame(self, kind: str = "full") -> bytes:
        """The current RoundOpen, signed; the deadline is the time left right now. `kind`
        (`_downlink`): "full" params; "delta", the changes against the previous params;
        "outer", only the outer step to apply (p2p members hold the aggregate); "full+m",
        the params then the outer momentum (p2p, so that the node can step itself later)."""
        state, run = self.state, self.run
        assert state is not None
        base: str | None = None
        payload = run.params_bytes
        if kind == "delta" and run.params_changes is not None:
            base, payload = run.prev_digest, run.params_changes
        elif kind == "outer":
            base = run.prev_digest
            payload = encode_outer_step(self.config.outer_lr, self.config.outer_momentum)
        elif kind == "full+m":
            payload = run.params_bytes + np.ascontiguousarray(run.momentum, "<f4").tobytes()
        return self.frame(RoundOpen(
            run_id=run.run_id, round=state.round, attempt=state.attempt,
            params_digest=run.params_digest,
            deadline_s=max(0.001, state.remaining(asyncio.get_running_loop().time())),
            inner_steps=self.config.inner_steps, inner_lr=self.config.inner_lr,
            batch_size=self.config.batch_size, base_digest=base,
            with_momentum=kind == "full+m", payload=payload))

    def _downlink(self, peer: Peer | None) -> str:
        """What the RoundOpen for `peer` carries (see `_open_frame`)."""
        run = self.run
        holds_prev = peer is not None and peer.holds is not None and peer.holds == run.prev_digest
        if self.config.transport == "p2p" and peer is not None and peer.role == "trainer":
            if (holds_prev and peer.has_momentum and peer.node_id in self._p2p_members
                    and run.prev_digest is not None):
                return "outer"
            return "full+m"
        if (peer is not None and holds_prev and run.params_changes is not None
                and "delta-params" in peer.features):
            return "delta"
        return "full"

    async def _send_open(self, conn: Connection, data: bytes | None = None, *,
                         mark: bool = True) -> None:
        assert self.state is not None
        peer = conn.peer
        if (mark and peer is not None and peer.role == "trainer"
                and peer.node_id not in self.state.updates):
            peer.state = "training"
        kind = self._downlink(peer)
        if data is None:
            data = self._open_frame(kind)
        await self.send(conn, data)
        if peer is not None:
            peer.holds = self.run.params_digest
            peer.has_momentum = peer.has_momentum or kind == "full+m"

    async def _broadcast_open(self, *, retry: bool = False) -> None:
        assert self.state is not None
        waiting = [p for p in list(self.peers.values())
                   if p.ws is not None and p.node_id not in self.state.updates]
        frames: dict[str, bytes] = {}  # each variant signed once, the same bytes for all
        sends = []
        for p in waiting:
            if p.ws is None:
                continue
            kind = self._downlink(p)
            if kind not in frames:
                frames[kind] = self._open_frame(kind)
            sends.append(self._send_open(Connection(ws=p.ws, remote="", peer=p),
                                         frames[kind], mark=not retry))
        await asyncio.gather(*sends)

    async def _broadcast(self, msg: Message) -> None:
        data = self.frame(msg)
        await asyncio.gather(*(self.send(Connection(ws=p.ws, remote="", peer=p), data)
                               for p in list(self.peers.values()) if p.ws is not None))

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _mark_stragglers(self) -> None:
        """Connected trainers still training when the attempt closes are straggling."""
        state = self.state
        assert state is not None
        for p in self.peers.values():
            if p.state == "training" and p.node_id not in state.updates:
                p.state = "straggling"

    def _committed_msg(self, *, final: bool) -> RoundCommitted:
        last = self.run.last_round
        return RoundCommitted(round=last["round"] if last else -1,
                              eval_loss=last["eval_loss"] if last else None,
                              n_updates=last["n_updates"] if last else 0,
                              params_digest=self.run.params_digest, final=final)

    def _done(self) -> bool:
        return self.config.rounds > 0 and self.run.version >= self.config.rounds

    async def run_rounds(self) -> None:
        """Open -> collect -> commit, forever (or until `rounds` are committed)."""
        try:
            await self._run_rounds()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = exc
            raise

    async def _run_rounds(self) -> None:
        loop = asyncio.get_running_loop()
        policy = RoundPolicy(quorum=self.config.quorum, deadline_s=self.config.deadline_s)
        # after a restart, the round that was interrupted waits up to resume_grace_s for the
        # nodes of the last committed round to reconnect and resubmit (they back off)
        expect: set[str] = set()
        if self.run.version > 0 and self.config.resume_grace_s > 0:
            expect = set(self.run.store.update_keys(self.run.version - 1))
        grace_until = loop.time() + self.config.resume_grace_s
        while not self._done():
            self.state = RoundState(round=self.run.version, policy=policy,
                                    opened_at=loop.time())
            self.replays.clear()  # older rounds are refused by number; hellos by challenge
            self._updates.clear()
            self._payloads.clear()
            self._round_bytes = [0, 0]
            started = time.time()
            log.info("round %d open", self.state.round)
            await self._broadcast_open()
            while True:
                now = loop.time()
                wait_s = self.state.remaining(now)
                decision = self.state.decide(now, self._active())
                if (decision is Decision.COMMIT and expect and now < grace_until
                        and wait_s > 0 and not expect <= set(self.state.updates)):
                    decision, wait_s = Decision.WAIT, min(wait_s, grace_until - now)
                if decision is Decision.COMMIT and self.config.validation:
                    await self._validate()
                    if len(self.state.updates) < policy.quorum:
                        decision = Decision.RETRY
                if decision is not Decision.WAIT:
                    self._mark_stragglers()
                if decision is Decision.COMMIT:
                    break
                if decision is Decision.RETRY:
                    self.state.retry(loop.time())
                    self.counters["retries"] += 1
                    log.warning("round %d below quorum (%d/%d) at its deadline: retry %d",
                                self.state.round, len(self.state.updates), policy.quorum,
                                self.state.attempt)
                    await self._broadcast_open(retry=True)
                    continue
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wait_s + 0.01)
            expect = set()
            pseudo_grad = None
            if self.config.transport == "p2p":
                pseudo_grad = await self._reduce_p2p()
                if pseudo_grad is None:
                    self.counters["retries"] += 1
                    continue  # below quorum after the reduction dropped members: again
            await self._commit(time.time() - started, pseudo_grad)
        self.finished = True
        self.state = None
        log.info("run finished after %d rounds", self.run.version)

    async def _commit(self, duration_s: float, pseudo_grad: np.ndarray | None = None) -> None:
        """Aggregate (unless the p2p reduction did), outer step, evaluate, store, announce."""
        state = self.state
        assert state is not None
        state.closed = True
        nodes = sorted(state.updates)
        rows = [self._updates[n][1] for n in nodes]
        if pseudo_grad is None:
            pseudo_grad = self._aggregate([self._updates[n][0] for n in nodes])
        outer = OuterConfig(lr=self.config.outer_lr, momentum=self.config.outer_momentum)
        theta, momentum = outer_step(self.run.params, pseudo_grad, self.run.momentum, outer)
        eval_loss = await asyncio.to_thread(self.run.evaluate, theta)
        losses = [r.train_loss for r in rows if r.train_loss is not None]
        train_loss = float(np.mean(losses)) if losses else None
        record = await asyncio.to_thread(
            self.run.commit, round=state.round, params=theta, momentum=momentum,
            attempts=state.attempt + 1, eval_loss=eval_loss, train_loss=train_loss,
            updates=rows, bytes_up=self._round_bytes[0], bytes_down=self._round_bytes[1],
            duration_s=duration_s)
        for peer in self.peers.values():
            if peer.state in ("submitted", "rejected"):
                peer.state = "idle"
        self.counters["rounds"] += 1
        await self._broadcast(self._committed_msg(final=self._done()))
        for hook in self.commit_hooks:
            res = hook(record)
            if asyncio.iscoroutine(res):
                await res

    def _aggregate(self, vectors: list[np.ndarray]) -> np.ndarray:
        """The run's rule over the round's updates."""
        cfg, state = self.config, self.state
        assert state is not None
        f = estimate_f(len(vectors), cfg.byzantine_fraction, rule=cfg.aggregator)
        wanted = estimate_f(len(vectors), cfg.byzantine_fraction)
        if f < wanted:  # the rule's bound on n: say so, every time it bites
            self.counters["f_clamped"] += 1
            log.warning("round %d: %s tolerates at most f=%d of %d updates; byzantine_fraction "
                        "%.2f asks for f=%d", state.round, cfg.aggregator, f, len(vectors),
                        cfg.byzantine_fraction, wanted)
        params = dict(cfg.aggregator_params)
        if cfg.aggregator == "centered-clipping" and cfg.cc_reference == "history":
            params["reference"] = history_reference(self.run.momentum, cfg.outer_momentum)
        return np.asarray(get_rule(cfg.aggregator)(vectors, f=f, **params), dtype=np.float32)

    def _record(self, round: int | None, node_id: str, digest: str | None, code: str,
                reason: str, validators: list[str]) -> None:
        try:
            self.run.store.record_rejection(round=round, node_id=node_id, digest=digest,
                                            code=code, reason=reason, validators=validators)
        except Exception:  # the record is evidence, not a reason to stop serving
            log.exception("could not record a rejection of %s", node_id[:12])

    # -- views ---------------------------------------------------------------------------
    def peers_view(self) -> list[dict[str, Any]]:
        return [{"node_id": p.node_id, "role": p.role, "transport": p.transport,
                 "runtime": p.runtime, "device": p.device,
                 "shard": p.shard, "state": p.state, "connected": p.ws is not None,
                 "first_seen": p.first_seen, "last_seen": p.last_seen,
                 "updates_accepted": p.accepted, "rejected": p.rejected,
                 "bytes_up": p.bytes_up, "bytes_down": p.bytes_down,
                 "p2p_relayed_bytes": p.relayed_bytes}
                for p in self.peers.values()]

    def status(self) -> dict[str, Any]:
        st = self.state
        return {
            "status": "finished" if self.finished else ("collecting" if st else "starting"),
            "round": st.round if st else self.run.version,
            "attempt": st.attempt if st else 0,
            "updates_in_round": len(st.updates) if st else 0,
            "peers_connected": len(self._active()),
            "accepted": self.counters["accepted"],
            "duplicates": self.counters["duplicates"],
            "retries": self.counters["retries"],
            "verdicts": self.counters["verdicts"],
            "stale_dropped": self.counters["stale_dropped"],
            "stale_applied": self.counters["stale_applied"],
            "f_clamped": self.counters["f_clamped"],
            "validation": self.config.validation,
            "rejected": dict(self.rejected),
            "rejected_total": sum(self.rejected.values()),
            "bytes_up": self.counters["bytes_up"],
            "bytes_down": self.counters["bytes_down"],
            # p2p reductions: disputes, liars, malformed results, dropped members, relayed bytes
            "p2p": {k.removeprefix("p2p_"): n for k, n in sorted(self.counters.items())
                    if k.startswith("p2p_")},
        }


