"""The round coordinator: peers, the open round, the reduction, the outer step and commits.

I/O-free decisions live in shared.rounds; the coordinator wires them to WebSocket peers, the
store and the evaluator. One instance per server process, kept in the app state. It is
composed of collaborators with explicit interfaces, each in its own module:

- `Outbox` (server.outbox): signs and sends frames, counts bytes, holds the peer table;
  collaborators reach nodes through its interface, server.peers.Nodes;
- `RoundOpener` (server.roundopen): the RoundOpen each node gets (full, delta, outer step);
- `RoundCollection` (server.collection): the open round's state and the updates it has
  taken; every Submit / Ready passes its guards, in one place;
- a `Reduction` (server.reduction), chosen once from `transport`: decode + robust rule at
  the server (ws, star) or the shard reduction among the members (p2p, server.p2p);
- `Validation` (server.validation): scores the candidates before a commit, with validators;
- `RtcHub` (server.rtc): signaling relay and the star peer, through server.rtc.RtcHost;
- `Evidence` (server.evidence): the rejection rows the ledger slashes on;
- `AutotuneLoop` (server.autotune): measures each round, asks shared.autotune for the next
  round's budget, codecs, deadline and quorum, and records why (run config `autotune`).

Every frame enters through `handle_frame` (signature, replay, decode, dispatch); every refusal
leaves through `reject` (typed error, log line, counter, evidence).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import numpy as np

from server.auth import authenticate
from server.autotune import AutotuneLoop
from server.collection import RoundCollection
from server.config import RunConfig
from server.dp_accountant import DpAccountant
from server.evidence import Evidence
from server.ledger import apply_setting
from server.outbox import Outbox
from server.outer_step import commit_step
from server.p2p import P2PReduction
from server.peers import Connection, Peer, close_reason
from server.reduction import ServerReduction, choose_reduction
from server.roundopen import RoundOpener
from server.rtc import RtcHub, RtcSettings
from server.runstate import RunState
from server.secagg_round import SecAggReduction
from server.slashing import Slashing
from server.stream_down import ParamsStreams
from server.streams import StreamIntake, stream_view
from server.validation import Validation
from shared.envelope import ReplayGuard
from shared.errors import (
    BadUpdate,
    ConflictingUpdate,
    FrameTooLarge,
    NotAdmitted,
    ProtocolError,
)
from shared.frame import PROTOCOL_VERSION, decode_frame
from shared.messages import (
    Ack,
    Challenge,
    Chunk,
    Dht,
    Error,
    Hello,
    Message,
    ParamsFetch,
    Ready,
    RoundCommitted,
    SecAgg,
    Shard,
    Signal,
    StreamSubmit,
    Submit,
    Verdict,
    Welcome,
)
from shared.rounds import Decision, RoundPolicy, RoundState

log = logging.getLogger("server.coordinator")
AGENT = "daa-prime-server/0.1"


CommitHook = Callable[[dict[str, Any]], Awaitable[None] | None]


class Coordinator:
    def __init__(self, run: RunState) -> None:
        self.run = run
        self.config: RunConfig = run.config
        self.counters: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()  # refusals by error code
        self.commit_hooks: list[CommitHook] = []
        self.finished = False
        self.error: BaseException | None = None  # why the round loop died, if it did
        self.replays = ReplayGuard()
        # secure aggregation: key adverts (~9 KB) and masked updates' signed headers
        self.max_payload = min(self.config.max_frame, 4 * run.n_params
                               + (65536 if self.config.secagg else 4096))
        self.outbox = Outbox(run, self.counters)
        self.peers: dict[str, Peer] = self.outbox.peers
        self.evidence = Evidence(run.store)
        self.slashing = self._wire_ledger()
        self.reduction = choose_reduction(run, self.outbox, self.evidence, self.counters)
        if isinstance(self.reduction, P2PReduction):  # outvoted owners are slashed
            self.reduction.outvoted = self.slashing.outvoted
        self.autotune = AutotuneLoop(run)
        if isinstance(self.reduction, ServerReduction):
            self.reduction.step_weights = self.autotune.weigh_by_steps
        self.opener = RoundOpener(run, self.outbox, self.reduction, self.autotune)
        self.collection = RoundCollection(self.config, run.n_params, self.reduction,
                                          self.counters, self.autotune,
                                          takes_part=self.opener.takes_part)
        self.validation = Validation(run, self.outbox, self.collection, self.evidence,
                                     self.counters, self.rejected)
        self.dp = DpAccountant(self.config, run.version)  # DP: sampling and epsilon
        self.rtc = RtcHub(self, RtcSettings.of(self.config))
        self.dht: Any = None  # server.dht.ServerDht when the run config has `dht` (server.app)
        self._wake = asyncio.Event()
        self.secagg = self.reduction if isinstance(self.reduction, SecAggReduction) else None
        if self.secagg is not None:  # secure aggregation (server.secagg_round)
            self.secagg.trainers, self.secagg.wake = self._trainers, self._wake.set
        self._tasks: set[asyncio.Future[Any]] = set()
        # streamed updates (server.streams): run option stream_chunk_mb, off by default
        self.streams = StreamIntake(self) if self.config.stream_chunk > 0 else None
        # ... and RoundOpen payloads larger than a chunk go in chunks (server.stream_down)
        self.params_streams = (ParamsStreams(self, self.config.stream_chunk)
                               if self.config.stream_chunk > 0 else None)
        self.opener.streams = self.params_streams

    @property
    def state(self) -> RoundState | None:
        """The open round (None before the first and after the last)."""
        return self.collection.state

    # -- sending (server.rtc.RtcHost) -----------------------------------------------------
    def frame(self, msg: Message) -> bytes:
        return self.outbox.frame(msg)

    async def send(self, conn: Connection, msg: Message | bytes) -> None:
        await self.outbox.send(conn, msg)

    def conn(self, node_id: str) -> Connection | None:
        return self.outbox.conn(node_id)

    async def reject(self, conn: Connection, err: ProtocolError, round_: int | None = None
                     ) -> None:
        """Typed error to the sender, a log line, a counter. Nothing else changes."""
        self.rejected[err.code] += 1
        who = conn.peer.node_id[:12] if conn.peer else conn.remote
        if conn.peer is not None:
            conn.peer.rejected += 1
            self.evidence.record(round_, conn.peer.node_id, None, err.code, err.message,
                                 ["server"])
        log.warning("rejected %s from %s: %s", err.code, who, err.message)
        reason = close_reason(conn)  # already at the limit: a frame server.ws did not stop
        conn.errors += 1
        if reason is not None:
            log.warning("closing %s after %s", who, reason)
            self._background(conn.ws.close())
            return
        await self.send(conn, Error(code=err.code, message=err.message, field=err.field,
                                    round=round_))

    # -- receiving -----------------------------------------------------------------------
    def challenge_frame(self, challenge: str) -> bytes:
        """The signed Challenge whose `challenge` a connection's Hello must sign."""
        return self.frame(self.challenge_msg(challenge))

    def challenge_msg(self, challenge: str) -> Challenge:
        ident = self.run.identity
        assert ident is not None
        return Challenge(run_id=self.run.run_id, challenge=challenge,
                         server_public_key=ident.public_key.hex(),
                         protocol_version=PROTOCOL_VERSION, agent=AGENT)

    async def greet(self, conn: Connection) -> None:
        """First frame on a new connection (in-memory drivers; server.ws pools them)."""
        await self.send(conn, self.challenge_frame(conn.challenge))

    async def handle_frame(self, conn: Connection, data: bytes) -> None:
        """Every frame from a node, on its socket or its star data channel."""
        conn.bytes_up += len(data)
        self.outbox.round_bytes[0] += len(data)
        self.counters["bytes_up"] += len(data)
        if conn.peer is not None:
            conn.peer.bytes_up += len(data)
            conn.peer.last_seen = time.time()
        round_: int | None = None
        try:
            frame = decode_frame(data, max_payload=self.max_payload)
            round_ = frame.header.get("round") if isinstance(frame.header.get("round"),
                                                             int) else None
            if frame.msg_type == Chunk.TYPE and self.streams is not None:  # unsigned
                await self.streams.on_chunk(conn, frame)
                return
            # signature + replay checks BEFORE the payload is inflated or decoded
            node_id, nonce, key = authenticate(
                frame, run_id=self.run.run_id, challenge=conn.challenge,
                peer_id=conn.peer.node_id if conn.peer else None, peer_key=conn.public_key)
            self.replays.check_and_remember(node_id, nonce)
            if frame.msg_type == Hello.TYPE:
                conn.public_key = key
            msg = self.slashing.decode(frame, data, node_id, key, self.max_payload)
            await self._dispatch(conn, msg)
        except ProtocolError as err:
            if isinstance(err, ConflictingUpdate) and conn.peer is not None:
                self.slashing.conflict(conn.peer.node_id, round_)
            await self.reject(conn, err, round_)
        except Exception:  # a bug, not the peer's fault: keep serving, say so, count it
            log.exception("internal error handling a frame from %s", conn.remote)
            await self.reject(conn, ProtocolError("internal server error; see the server log"))

    async def _dispatch(self, conn: Connection, msg: Message) -> None:
        """An authenticated message to the collaborator that handles its type."""
        if isinstance(msg, Hello):
            await self._on_hello(conn, msg)
        elif isinstance(msg, Submit | Ready):
            await self._on_update(conn, msg)
        elif isinstance(msg, Verdict):
            self.validation.on_verdict(conn, msg)
            self._wake.set()
        elif isinstance(msg, Signal):
            await self.rtc.on_signal(conn, msg)
        elif isinstance(msg, Shard):
            await self.reduction.on_shard(conn, msg)
        elif isinstance(msg, SecAgg):
            if self.secagg is None:
                raise BadUpdate("this run does not aggregate securely (secagg)",
                                field="msg_type")
            await self.secagg.on_secagg(conn, msg)
        elif isinstance(msg, StreamSubmit):  # a large update, in chunks (server.streams)
            if self.streams is None:
                raise BadUpdate("this run takes updates in one frame (stream_chunk_mb 0)",
                                field="msg_type")
            await self.streams.on_start(conn, msg)
        elif isinstance(msg, ParamsFetch):  # a streamed RoundOpen's chunks, please
            if self.params_streams is None:
                raise BadUpdate("this run sends RoundOpens in one frame (stream_chunk_mb 0)",
                                field="msg_type")
            await self.params_streams.on_fetch(conn, msg)
        elif isinstance(msg, Dht):  # peer discovery (server.dht; run config `dht`)
            if self.dht is None:
                raise BadUpdate("this server runs no DHT node (run config dht)",
                                field="msg_type")
            await self.dht.on_message(conn, msg)

    async def oversized(self, conn: Connection) -> None:
        """The transport refused a message above its limit (the socket is closing)."""
        err = FrameTooLarge(f"message exceeds the {self.config.max_frame} byte limit")
        self.rejected[err.code] += 1
        log.warning("rejected %s from %s: %s", err.code, conn.remote, err.message)

    async def _on_hello(self, conn: Connection, msg: Hello) -> None:
        if not self.run.ledger.admits(msg.node_id):  # the socket refuses these before us
            raise NotAdmitted(f"this run admits identities with at least "
                              f"{self.config.ledger_min_stake} stake", field="node_id")
        transport = self.reduction.on_join(msg)  # may refuse the node
        old = self.peers.get(msg.node_id)
        if old is not None and old.ws is not None:
            log.info("node %s reconnected; closing its previous connection", msg.node_id[:12])
            self._background(old.ws.close())  # a dead peer's close may take seconds
        shard = self.run.store.shard_for(msg.node_id, msg.runtime, self.config.n_shards)
        peer = Peer(node_id=msg.node_id, runtime=msg.runtime, device=msg.device, shard=shard,
                    ws=conn.ws, role=msg.role, transport=transport,
                    features=frozenset(f for f in msg.features.split(",") if f))
        if old is not None:
            peer.first_seen, peer.bytes_up, peer.bytes_down = (old.first_seen, old.bytes_up,
                                                               old.bytes_down)
            peer.accepted, peer.rejected = old.accepted, old.rejected
        peer.bytes_up += conn.bytes_up
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
            rtc_timeout_s=self.config.rtc_timeout_s, worker_momentum=self.config.worker_momentum,
            ice_servers=self.rtc.ice_for(msg.node_id), secagg=self.config.secagg,
            stream_chunk=self.config.stream_chunk, overlap=self.config.overlap))
        if self.finished:
            await self.send(conn, self._committed_msg(final=True))
        elif self.state is not None and not self.state.closed:
            await self.opener.send(self.state, conn)
        self._wake.set()

    async def _on_update(self, conn: Connection, msg: Submit | Ready) -> None:
        """A trainer's update (Submit: ws/star; Ready: p2p): guarded and taken by the
        round collection, acknowledged here."""
        assert conn.peer is not None  # authenticate made sure
        outcome = self.collection.take(conn.peer, msg)
        # hierarchical runs acknowledge the Readys in each group's signed plan instead (one
        # signature per group, not per member: server.hierarchy)
        if getattr(self.reduction, "acks_updates", True):
            await self.send(conn, Ack(round=msg.round, digest=msg.digest,
                                      status=outcome.value))
        self._wake.set()

    def _wire_ledger(self) -> Slashing:
        """Slashing on the node's own signed frames; passed proposals change the config at
        the next round boundary (server.ledger)."""
        slashing = Slashing(self.run.ledger)
        self.evidence.listeners.append(slashing.on_evidence)

        def on_config(key: str, value: Any) -> None:
            apply_setting(self.config, key, value)
            self.run.store.update_config(self.config.to_dict())

        self.run.ledger.on_config.append(on_config)
        return slashing

    def disconnect(self, conn: Connection) -> None:
        peer = conn.peer
        if peer is not None and peer.ws is conn.ws:
            peer.ws = None
            peer.state = "gone"
            log.info("node %s left", peer.node_id[:12])
            if self.params_streams is not None:
                self.params_streams.disconnect(peer.node_id)
            self._background(self.rtc.close(peer.node_id))
            self._wake.set()

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- rounds --------------------------------------------------------------------------
    def _active(self) -> list[str]:
        """The trainers the open round waits for (secure aggregation: those masking)."""
        nodes = self._trainers()
        return self.secagg.expected(nodes) if self.secagg is not None else nodes

    def _trainers(self) -> list[str]:
        """Connected trainers: the participants a round waits for (with DP sampling, the
        round's sampled ones)."""
        sample = self.opener.sample
        return [p.node_id for p in self.outbox.connected("trainer")
                if sample is None or sample(p.node_id)]

    def _resample(self, state: RoundState) -> None:
        """DP: a retried round none of whose sampled trainers is still connected draws its
        sample again (from the next draws; each one an accounted step)."""
        if self.opener.sample is None or self._active() or state.updates:
            return
        self._draw_sample(state.round)

    def _draw_sample(self, round_: int) -> int | None:
        """DP: draw `round_`'s Poisson sample of the connected trainers and hand it, with the
        RoundOpen's noise fields, to the opener; its size, or None without DP sampling."""
        self.opener.sample = None
        picked = self.dp.sample(round_, self._active())
        if picked is None:
            return None
        self.opener.sample = self.dp.member
        self.opener.dp_fields = self.dp.open_fields(len(picked))
        return len(picked)

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
        return ((self.config.rounds > 0 and self.run.version >= self.config.rounds)
                or self.dp.budget_spent())

    # -- the round loop ------------------------------------------------------------------
    async def run_rounds(self) -> None:
        """Open -> collect -> reduce -> commit, forever (or until `rounds` are committed)."""
        try:
            await self._run_rounds()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = exc
            raise

    async def _run_rounds(self) -> None:
        loop = asyncio.get_running_loop()
        # after a restart, the round that was interrupted waits up to resume_grace_s for the
        # nodes of the last committed round to reconnect and resubmit (they back off)
        expect: set[str] = set()
        if self.run.version > 0 and self.config.resume_grace_s > 0:
            expect = set(self.run.store.update_keys(self.run.version - 1))
        grace_until = loop.time() + self.config.resume_grace_s
        while not self._done():
            # per round: a passed proposal may have changed quorum or deadline_s
            # ... and autotune may have set this round's (never below the run's quorum)
            policy = self.autotune.round_policy(
                RoundPolicy(quorum=self.config.quorum, deadline_s=self.config.deadline_s))
            sampled = self._draw_sample(self.run.version)
            if sampled is not None:  # DP: the quorum is at most the round's sample
                policy = dataclasses.replace(policy, quorum=max(1, min(policy.quorum, sampled)))
            state = RoundState(round=self.run.version, policy=policy, opened_at=loop.time())
            self.collection.open(state)
            self.autotune.on_round_open(state.round)
            self.replays.clear()  # older rounds are refused by number; hellos by challenge
            self.outbox.round_bytes = [0, 0]
            started = time.time()
            log.info("round %d open", state.round)
            await self.opener.broadcast(state)
            if self.secagg is not None:
                self.secagg.start(state)
            while True:
                now = loop.time()
                wait_s = state.remaining(now)
                decision = state.decide(now, self._active())
                if (decision is Decision.COMMIT and expect and now < grace_until
                        and wait_s > 0 and not expect <= set(state.updates)):
                    decision, wait_s = Decision.WAIT, min(wait_s, grace_until - now)
                if decision is Decision.COMMIT and self.config.validation:
                    await self.validation.validate()
                    if len(state.updates) < policy.quorum:
                        decision = Decision.RETRY
                if decision is not Decision.WAIT:
                    self._mark_stragglers()
                if decision is Decision.COMMIT:
                    break
                if decision is Decision.RETRY:
                    state.retry(loop.time())
                    self._resample(state)
                    self.counters["retries"] += 1
                    log.warning("round %d below quorum (%d/%d) at its deadline: retry %d",
                                state.round, len(state.updates), policy.quorum, state.attempt)
                    await self.opener.broadcast(state, retry=True)
                    if self.secagg is not None:
                        self.secagg.start(state)
                    continue
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wait_s + 0.01)
            expect = set()
            pseudo_grad = await self.reduction.reduce(state, self.collection)
            if pseudo_grad is None:
                self.counters["retries"] += 1
                continue  # below quorum after the reduction dropped members: again
            handed, pseudo_grad = [pseudo_grad], None  # _commit may let go of it (memory)
            await self._commit(time.time() - started, handed)
        self.finished = True
        if self.secagg is not None:
            self.secagg.cancel()
        self.collection.finish()
        log.info("run finished after %d rounds%s", self.run.version,
                 f": {self.dp.stop_reason}" if self.dp.stop_reason else "")

    async def _commit(self, duration_s: float, handed: list[np.ndarray]) -> None:
        """Outer step with the round's aggregate, evaluate, store, announce."""
        state = self.state
        assert state is not None
        state.closed = True
        rows = [self.collection.rows[n] for n in sorted(state.updates)]
        # autotune reads the aggregate after the commit; else the outer step lets go of it
        pseudo_grad = handed[0] if self.autotune.enabled else np.zeros(0, np.float32)
        theta, momentum, step = await asyncio.to_thread(
            commit_step, self.config, self.run.params, handed, self.run.momentum)
        await asyncio.to_thread(self.dp.on_commit, state.round)
        eval_loss = await asyncio.to_thread(self.run.evaluate, theta)
        losses = [r.train_loss for r in rows if r.train_loss is not None]
        train_loss = float(np.mean(losses)) if losses else None
        up, down = self.outbox.round_bytes
        record = await asyncio.to_thread(
            self.run.commit, round_=state.round, params=theta, momentum=momentum,
            attempts=state.attempt + 1, eval_loss=eval_loss, train_loss=train_loss,
            updates=rows, bytes_up=up, bytes_down=down, duration_s=duration_s,
            sparse_step=step)
        await asyncio.to_thread(  # the next round's settings, from this round's measures
            self.autotune.after_commit, round_=state.round, duration_s=duration_s,
            eval_loss=eval_loss, aggregate=pseudo_grad, n_active=len(self._active()),
            vectors=[self.collection.vectors[n] for n in sorted(state.updates)
                     if n in self.collection.vectors],
            scores=dict(self.validation.scores), samples=self.autotune.take_samples())
        for peer in self.peers.values():
            if peer.state in ("submitted", "rejected"):
                peer.state = "idle"
        self.counters["rounds"] += 1
        await self.outbox.to_all(list(self.peers.values()),
                                 self._committed_msg(final=self._done()))
        for hook in self.commit_hooks:
            res = hook(record)
            if asyncio.iscoroutine(res):
                await res

    # -- views ---------------------------------------------------------------------------
    def peers_view(self) -> list[dict[str, Any]]:
        return [{"node_id": p.node_id, "role": p.role, "transport": p.transport,
                 "runtime": p.runtime, "device": p.device,
                 "shard": p.shard, "state": p.state, "connected": p.ws is not None,
                 "first_seen": p.first_seen, "last_seen": p.last_seen,
                 "updates_accepted": p.accepted, "rejected": p.rejected,
                 "bytes_up": p.bytes_up, "bytes_down": p.bytes_down,
                 "p2p_relayed_bytes": p.relayed_bytes, "ice_pairs": dict(p.ice_pairs)}
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
            "stream": stream_view(self.counters),  # streamed updates, by path (server.streams)
            "autotune": self.autotune.view(),
            "dp": self.dp.view(),
            "stop_reason": self.dp.stop_reason,
            "secagg": self.secagg.view() if self.secagg is not None else None,
        }
