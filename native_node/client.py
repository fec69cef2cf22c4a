"""The node's control-channel client: join, train each round, submit, reconnect with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import numpy as np

from ml.data import DataSpec
from ml.scoring import ValidatorRole
from ml.workload import Workload, from_spec
from native_node import journal
from native_node.encoder import UpdateEncoder
from native_node.trainer import RoundResult, Trainer
from native_node.trust import ServerTrust, UntrustedServer
from shared.codecs import make_codec
from shared.downlink import resolve
from shared.envelope import Identity, new_nonce
from shared.errors import BadUpdate, ProtocolError
from shared.messages import (
    SERVER,
    Ack,
    Challenge,
    Error,
    Hello,
    Message,
    Ready,
    RoundCommitted,
    RoundOpen,
    Shard,
    ShardPlan,
    Signal,
    Submit,
    ValidateRequest,
    Verdict,
    Welcome,
    sha256_hex,
)

if TYPE_CHECKING:  # aiortc is imported only when a run uses the star or p2p transport
    from native_node.p2p import P2PRole
    from transport.rtc import StarUplink

log = logging.getLogger("native_node")
AGENT = "daa-prime-native/0.1"
FATAL_CODES = {"unsupported_version"}
MAX_MESSAGE = 512 * 1024 * 1024


class FatalError(Exception):
    """The server refused us for a reason a retry cannot fix."""


@dataclass(frozen=True, kw_only=True)
class NodeOptions:
    coordinator: str  # host:port of the server
    identity: Identity  # this node's ML-DSA-65 key pair
    state_dir: Path  # where the identity lives
    device: str = "cpu"  # torch device
    data_path: str | None = None  # local copy of a text run's data file
    max_rounds: int = 0  # leave after this many submitted rounds (0: until the run ends)
    progress: bool = True  # show a progress bar per round
    backoff_max_s: float = 10.0  # longest wait between reconnect attempts
    server_id: str | None = None  # require this server key (else pin the first one per run)
    handshake_timeout_s: float = 10.0  # reconnect when no Welcome arrives within this
    role: str = "trainer"  # "trainer" or "validator" (scores others' updates, never trains)


class Backoff:
    """Exponential backoff with jitter: 0.25 s, 0.5 s, 1 s ... up to `cap`."""

    def __init__(self, cap: float, first: float = 0.25) -> None:
        self.cap, self.first, self.n = cap, first, 0

    def next(self) -> float:
        delay = min(self.cap, self.first * (2 ** self.n))
        self.n += 1
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.n = 0


class NodeClient:
    def __init__(self, opts: NodeOptions) -> None:
        self.opts = opts
        self.work: Workload | None = None
        self.trainer: Trainer | None = None
        self.validator: ValidatorRole | None = None  # set when role is "validator"
        self.uplink: StarUplink | None = None  # WebRTC data channel (transport "star")
        self.p2p: P2PRole | None = None  # shard exchange with the other nodes ("p2p")
        self.pending_ready: Ready | None = None  # p2p: our Ready for the open round
        self.held: np.ndarray | None = None  # the global params of the last RoundOpen
        self.held_digest: str | None = None  # ... and their digest (base of a params delta)
        self._tasks: set[asyncio.Future[Any]] = set()
        self.welcome: Welcome | None = None
        self.challenge: Challenge | None = None
        self.encoder: UpdateEncoder | None = None  # codec + error feedback + PowerSGD state
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.pending: Submit | None = None  # trained, not yet known to be committed
        self.pending_params: str | None = None  # params digest the pending update started from
        # an update journaled before a crash (native_node.journal), offered at the next round
        self.journaled = journal.recover(opts.state_dir, opts.identity.node_id)
        self.task: asyncio.Task[None] | None = None
        self.task_round: int | None = None
        self.cancel = threading.Event()
        self.stop = asyncio.Event()
        self.submitted = 0
        self.refused = 0  # frames from the server that failed verification
        self.trust = ServerTrust(opts.state_dir, expected_server_id=opts.server_id,
                                 max_payload=MAX_MESSAGE)
        self.last_eval: float | None = None
        self._closing: asyncio.Future[bool] | None = None

    # -- connection loop -----------------------------------------------------------------
    async def run(self) -> int:
        try:
            return await self._connect_loop()
        finally:
            if self.uplink is not None:
                await self.uplink.close()
            if self.p2p is not None:
                await self.p2p.close()

    async def _connect_loop(self) -> int:
        backoff = Backoff(self.opts.backoff_max_s)
        url = f"ws://{self.opts.coordinator}/ws"
        async with aiohttp.ClientSession() as http:
            while not self.stop.is_set():
                try:
                    async with http.ws_connect(url, heartbeat=20.0,
                                               max_msg_size=MAX_MESSAGE) as ws:
                        self.ws = ws
                        backoff.reset()
                        if await self._session(ws):
                            return 0
                except FatalError as exc:
                    log.error("%s", exc)
                    return 2
                except (aiohttp.ClientError, ConnectionError, OSError) as exc:
                    log.warning("server %s unreachable (%s)", self.opts.coordinator,
                                exc.__class__.__name__)
                finally:
                    self.ws = None
                if self.stop.is_set():
                    break
                delay = backoff.next()
                log.info("reconnecting in %.1f s", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=delay)
        return 0

    def shutdown(self) -> None:
        self.cancel.set()
        self.stop.set()
        if self.ws is not None:
            self._closing = asyncio.ensure_future(self.ws.close())

    @property
    def node_id(self) -> str:
        return self.opts.identity.node_id

    def _sign(self, msg: Message) -> bytes:
        """`msg` with a fresh nonce, signed as this node; Submit payloads zstd'd when it pays."""
        assert self.challenge is not None
        msg = dataclasses.replace(msg, nonce=new_nonce())  # type: ignore[type-var]
        sign = self.opts.identity.signer(run_id=self.challenge.run_id,
                                         round=getattr(msg, "round", -1), msg_type=msg.TYPE,
                                         nonce=msg.nonce)  # type: ignore[attr-defined]
        return msg.to_frame(sign=sign, compress=isinstance(msg, Submit))

    async def _send_raw(self, frame: bytes) -> None:
        if self.ws is not None and not self.ws.closed:
            await self.ws.send_bytes(frame)

    async def _send(self, msg: Hello | Submit | Verdict | Signal | Ready) -> None:
        """Sign (fresh nonce each time) and send; Submit payloads are zstd'd when it pays.
        With the star transport an update goes over the data channel when it is open."""
        if self.ws is None or self.ws.closed or self.challenge is None:
            return
        frame = self._sign(msg)
        if isinstance(msg, Submit) and self.uplink is not None and await self.uplink.send(frame):
            return
        await self.ws.send_bytes(frame)

    async def _start_uplink(self, msg: Welcome) -> None:
        """transport "star": offer a data channel to the server's peer (relay on failure)."""
        if self.uplink is not None:
            await self.uplink.close()
            self.uplink = None
        if msg.transport != "star" or self.opts.role != "trainer":
            return

        async def signal(kind: str, data: str) -> None:
            await self._send(Signal(run_id=msg.run_id, node_id=self.node_id, to=SERVER,
                                    kind=kind, data=data))

        from transport.rtc import StarUplink  # aiortc: ~0.3 s of start-up, only when used

        self.uplink = StarUplink(signal, timeout_s=msg.rtc_timeout_s)
        await self.uplink.start()
        task = asyncio.ensure_future(self.uplink.wait_open())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _session(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        """One connection. True when the run is over (or max_rounds reached)."""
        self.challenge = None
        self.trust.reset()
        joined = asyncio.Event()
        loop = asyncio.get_running_loop()

        def handshake_timeout() -> None:  # a lost Challenge or Welcome must not hang us
            if not joined.is_set() and not ws.closed:
                log.warning("no welcome from the server within %.0f s; reconnecting",
                            self.opts.handshake_timeout_s)
                self._background_close(ws)

        timer = loop.call_later(self.opts.handshake_timeout_s, handshake_timeout)
        try:
            return await self._frames(ws, joined)
        finally:
            timer.cancel()

    def _background_close(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._closing = asyncio.ensure_future(ws.close())

    async def _frames(self, ws: aiohttp.ClientWebSocketResponse, joined: asyncio.Event) -> bool:
        async for raw in ws:
            if raw.type != aiohttp.WSMsgType.BINARY:
                continue
            try:
                msg = self.trust.open(raw.data)
            except ProtocolError as exc:
                self.refused += 1
                log.warning("ignoring a frame from the server: %s", exc)
                continue
            except UntrustedServer as exc:
                raise FatalError(str(exc)) from exc
            if isinstance(msg, Challenge):
                log.info("server %s (pinned for run %s)", (self.trust.server_id or "")[:16],
                         msg.run_id)
                self.challenge = msg
                ident = self.opts.identity
                await self._send(Hello(node_id=ident.node_id, public_key=ident.public_key.hex(),
                                       challenge=msg.challenge, nonce=new_nonce(),
                                       runtime="native", agent=AGENT, device=self.opts.device,
                                       role=self.opts.role,
                                       features="delta-params" if self.opts.role == "trainer"
                                       else ""))
            elif isinstance(msg, Welcome):
                joined.set()
                await self._on_welcome(msg)
            elif isinstance(msg, RoundOpen) and self.validator is not None:
                self.validator.on_round_open(msg)
            elif isinstance(msg, RoundOpen):
                await self._on_round_open(msg)
            elif isinstance(msg, ValidateRequest):
                await self._on_validate(msg)
            elif isinstance(msg, Signal) and msg.node_id == SERVER and msg.kind == "answer":
                if self.uplink is not None:
                    await self.uplink.on_answer(msg.data)
            elif isinstance(msg, Signal) and self.p2p is not None:
                await self.p2p.on_signal(msg)
            elif isinstance(msg, ShardPlan | Shard) and self.p2p is not None:
                self.p2p.put(msg)
            elif isinstance(msg, Ack):
                log.info("round %d: update %s (%s)", msg.round, msg.status, msg.digest[:12])
            elif isinstance(msg, RoundCommitted):
                if self._on_committed(msg):
                    return True
            elif isinstance(msg, Error):
                log.warning("server refused a message: %s: %s", msg.code, msg.message)
                if msg.code in FATAL_CODES:
                    raise FatalError(f"server: {msg.code}: {msg.message}")
            if self.opts.max_rounds and self.submitted >= self.opts.max_rounds \
                    and self.pending is None:
                log.info("submitted %d rounds; leaving", self.submitted)
                return True
        if self.stop.is_set():
            return True
        log.warning("connection to the server closed")
        return False

    # -- handlers ------------------------------------------------------------------------
    async def _on_welcome(self, msg: Welcome) -> None:
        self.welcome = msg
        if self.work is None or self.work.model_id != msg.model_id:
            self._cancel_training()
            spec = DataSpec.from_dict(msg.data)
            work = await asyncio.to_thread(from_spec, msg.model, spec,
                                           local_path=self.opts.data_path,
                                           cache_dir=self.opts.state_dir / "datasets")
            if work.model_id != msg.model_id or work.n_params != msg.n_params:
                raise FatalError(f"model mismatch: server model id {msg.model_id[:12]} "
                                 f"({msg.n_params} params), rebuilt {work.model_id[:12]} "
                                 f"({work.n_params}); update this node's software")
            self.work = work
            if self.opts.role == "validator":
                self.validator = ValidatorRole(work)
            else:
                self.trainer = Trainer(work, shard=msg.shard, n_shards=msg.n_shards,
                                       node_id=self.node_id, device=self.opts.device)
            self.pending = None
        codec = make_codec(msg.codec, **msg.codec_params)
        enc = self.encoder
        if (enc is None or enc.codec != codec or enc.error_feedback != msg.error_feedback
                or enc.layout is not self.work.manifest or enc.beta != msg.worker_momentum):
            if enc is not None and (enc.residual is not None or enc.momentum is not None):
                log.info("error-feedback residual and worker momentum reset (new model, codec "
                         "or setting)")
            self.encoder = UpdateEncoder(codec, error_feedback=msg.error_feedback,
                                         layout=self.work.manifest,
                                         momentum=msg.worker_momentum)
        await self._start_uplink(msg)
        if msg.transport == "p2p" and self.opts.role == "trainer" and (
                self.p2p is None or self.p2p.run_id != msg.run_id):
            from native_node.p2p import P2PRole  # aiortc, only when used

            if self.p2p is not None:
                await self.p2p.close()
            self.p2p = P2PRole(self.node_id, msg.run_id, self._sign, self._send_raw,
                               timeout_s=msg.rtc_timeout_s)
        log.info("joined run %s as %s: %s, %d params, shard %d/%d, codec %s%s", msg.run_id,
                 self.node_id[:12], msg.model.get("name"), msg.n_params, msg.shard,
                 msg.n_shards, codec.name, " + error feedback" if msg.error_feedback else "")

    async def _on_round_open(self, msg: RoundOpen) -> None:
        try:  # full params, or the changes against the params we hold (shared.downlink)
            theta = (self.p2p.params(msg, self.held, self.held_digest) if self.p2p is not None
                     else resolve(msg, self.held, self.held_digest))
        except BadUpdate as exc:
            log.warning("round %d: %s; reconnecting for the full params", msg.round, exc)
            self.held = self.held_digest = None
            if self.ws is not None:
                await self.ws.close()
            return
        self.held, self.held_digest = theta, msg.params_digest
        if self.journaled is not None and self.welcome is not None:  # first round after start
            entry, self.journaled = self.journaled, None
            if journal.matching(entry, run_id=self.welcome.run_id, round=msg.round,
                                params_digest=msg.params_digest, state_dir=self.opts.state_dir):
                self.pending, self.pending_params = entry.submit, entry.params_digest
        ready = self.pending_ready
        if (ready is not None and ready.round == msg.round and self.p2p is not None
                and self.p2p.delta_round == msg.round and self.pending_params == msg.params_digest):
            log.info("round %d: telling the server again that our update is ready", msg.round)
            await self._send(ready)
            return
        if (self.pending is not None and self.pending.round == msg.round
                and self.pending_params == msg.params_digest):
            log.info("round %d: resubmitting the update trained before the reconnect",
                     msg.round)
            await self._send(self.pending)
            return
        if self.task is not None and not self.task.done() and self.task_round == msg.round:
            return  # a retry of the round we are already training
        self._cancel_training()
        self.pending = None
        self.cancel = threading.Event()
        self.task_round = msg.round
        self.task = asyncio.create_task(self._train_and_submit(msg, theta, self.cancel))

    async def _on_validate(self, msg: ValidateRequest) -> None:
        if self.validator is None:
            log.warning("round %d: a validation request, but this node is a %s", msg.round,
                        self.opts.role)
            return
        try:
            verdict = await asyncio.to_thread(self.validator.verdict, msg, node_id=self.node_id)
        except ProtocolError as exc:
            log.warning("round %d: cannot validate: %s", msg.round, exc)
            return
        await self._send(verdict)

    def _on_committed(self, msg: RoundCommitted) -> bool:
        if self.pending_ready is not None and self.pending_ready.round <= msg.round:
            self.pending_ready = None
        if self.pending is not None and self.pending.round <= msg.round:
            self.pending = None
            journal.clear(self.opts.state_dir)
        if msg.round >= 0:
            self.last_eval = msg.eval_loss
            loss = f"{msg.eval_loss:.4f}" if msg.eval_loss is not None else "n/a"
            log.info("round %d committed: eval loss %s from %d updates", msg.round, loss,
                     msg.n_updates)
        if msg.final:
            log.info("the run is finished")
        return msg.final

    def _cancel_training(self) -> None:
        if self.task is not None and not self.task.done():
            self.cancel.set()

    async def _train_and_submit(self, msg: RoundOpen, theta: np.ndarray,
                                cancel: threading.Event) -> None:
        assert self.trainer is not None and self.welcome is not None
        bar = self._progress_bar(msg)
        try:
            result: RoundResult = await asyncio.to_thread(
                self.trainer.train_round, theta, steps=msg.inner_steps, lr=msg.inner_lr,
                batch_size=msg.batch_size, cancel=cancel,
                progress=(lambda i, loss: bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                          or bar.update(1)) if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        if cancel.is_set() or result.steps < msg.inner_steps:
            log.info("round %d: training cancelled after %d steps", msg.round, result.steps)
            return
        if self.p2p is not None:  # p2p: the update stays here; the shard owners get it
            delta = np.ascontiguousarray(result.delta, dtype="<f4")
            self.p2p.trained(msg.round, delta)
            ready = Ready(run_id=self.welcome.run_id, round=msg.round, node_id=self.node_id,
                          length=int(delta.size), digest=sha256_hex(delta.tobytes()),
                          train_loss=result.train_loss, samples=result.samples,
                          compute_s=round(result.compute_s, 4))
            self.pending_ready, self.pending_params = ready, msg.params_digest
            self.submitted += 1
            log.info("round %d: %d steps in %.1f s; update ready for the p2p reduction",
                     msg.round, result.steps, result.compute_s)
            await self._send(ready)
            return
        assert self.encoder is not None
        codec = self.encoder.codec
        payload = self.encoder.encode(result.delta)
        submit = Submit(run_id=self.welcome.run_id, round=msg.round, node_id=self.node_id,
                        nonce=new_nonce(), codec=codec.name, length=int(result.delta.size),
                        digest=sha256_hex(payload), train_loss=result.train_loss,
                        samples=result.samples, compute_s=round(result.compute_s, 4),
                        payload=payload)
        try:  # journal first: after a crash from here on, the node resubmits, not retrains
            await asyncio.to_thread(journal.save, self.opts.state_dir, journal.Entry(
                params_digest=msg.params_digest, submit=submit))
        except OSError as exc:
            log.warning("round %d: cannot journal the update (%s)", msg.round, exc)
        self.pending, self.pending_params = submit, msg.params_digest
        self.submitted += 1
        loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "n/a"
        log.info("round %d: %d steps in %.1f s, train loss %s; submitting %d bytes", msg.round,
                 result.steps, result.compute_s, loss, len(payload))
        try:
            await self._send(submit)
        except (ConnectionError, aiohttp.ClientError) as exc:
            log.warning("round %d: submit failed (%s); will resubmit after reconnect",
                        msg.round, exc)

    def _progress_bar(self, msg: RoundOpen) -> Any:
        if not self.opts.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=msg.inner_steps, desc=f"round {msg.round}", unit="step",
                    leave=False, dynamic_ncols=True)
