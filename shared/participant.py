"""A training participant's protocol logic, without I/O (stdlib only: it runs in Pyodide).

The ONE implementation of what a participant does in a round. Three drivers feed it the
frames they receive (`Participant.receive`) and carry out the events it returns: the browser
tab (browser/node/node_glue.py + node.js, training with ONNX Runtime Web), the native node
(native_node/client.py, training with torch) and the simulator (bench/sim_nodes.py, 1,000
nodes in one process). When a driver's trainer has the round's pseudo-gradient it calls
`Participant.submit` (a native node in a streamed run hands it a chunk source:
shared.chunk_submit). This class owns everything a participant must get right about the
protocol: the server's signed Challenge and key pin (shared.trust), the signed Hello, the round's
params (full, or a params delta checked against its digest: shared.downlink; or, in `p2p` runs,
the outer step applied to the aggregate the node holds, through `resolver`), worker momentum,
the codec with its error-feedback residual (and PowerSGD's warm start), the signed Submit (or
`Ready` in `p2p` runs) with client-level DP first when the RoundOpen asks for it (shared.dp:
clip to `dp_clip`, add this node's share of the round's noise), and its idempotent
resubmission after a reconnect, and the pending-update journal entry (one JSON format,
`journal_entry` / `restore`, stored by every runtime as is: the tab in its storage, the
native node in a file). Numeric work runs on whatever vectors
shared.vec gives (numpy natively, array('f') in Pyodide); a platform encoder (the tab's JS
codecs, shared.platform) takes over the hot loop where one is registered.

Events are plain dicts (JSON-able except `bytes` values), `kind` first:

| kind      | fields                                                                     |
|-----------|----------------------------------------------------------------------------|
| send      | msg_type, frame (bytes): send it to the server as one binary WebSocket     |
|           | message (a Submit, type 4, may go over the star data channel instead)      |
| stream    | update (shared.chunk_encode.Spooled): our update, encoded by chunks into a |
|           | spool: stream it from there (shared.stream_up.Sender.start_spooled)        |
| signal    | from, signal (offer/answer/candidate/bye), data: WebRTC signaling for us   |
| welcome   | run_id, node_id, server_id, model, model_id, data, shard, n_shards, codec, |
|           | error_feedback, n_params, transport, rtc_timeout_s                         |
| train     | round, attempt, params (float32 LE bytes), params_digest, steps, lr,       |
|           | batch_size, deadline_s, time_budget_s (None: train exactly `steps`; else   |
|           | ask `keep_training` before each step: at most `steps`, within the budget)  |
|           | merge (only when True): the steps run ahead (train_ahead) are this round's:|
|           | move them onto params (shared.overlap.merge) and go on, steps in all       |
| train_ahead | after_round: (run option overlap) train the next round's steps from the  |
|           | local params now, before its RoundOpen comes (shared.overlap)              |
| resubmit  | round, params, params_digest, digest: the journaled update for this round  |
|           | is sent again (next event), instead of training                            |
| cancel    | round: stop training it (a newer round opened)                             |
| ack       | round, status ("accepted" / "duplicate"), digest                           |
| committed | round, eval_loss, n_updates, params_digest, final                          |
| error     | code, message, round: the server refused something we sent (or training    |
|           | diverged: code "not_finite")                                               |
| refused   | message: a frame from the server failed verification and was dropped      |
| reconnect | message: close the socket and connect again (full params needed)           |
| journal   | entry (JSON str) or None: persist it; hand it to `restore` after a reload |
| fatal     | message: stop; a retry cannot fix this (untrusted server, model mismatch)  |
| round     | round, params_digest: (validator role) theta_r is held                     |
| validate  | round, params, codec, length, candidates [{node_id, digest, payload}]:    |
|           | (validator role) score them and call `verdict`                             |
| ready     | round, delta (float32 LE bytes): (`p2p` runs) keep this update for the     |
|           | shard owners; the signed Ready follows (next event)                        |
| secagg    | round, stage: "waiting" (trained; the secure-aggregation key stages still  |
|           | run) or "masked" (sent; `plain`: the fixed-point ring bytes before masking,|
|           | for the node's own checks; they never leave it) (shared.secagg.round)      |
| p2p       | message (ShardPlan or Shard, verified): hand it to the p2p reduction       |
| dht       | message (Dht, verified): hand it to the DHT carrier (native_node.dht)      |
|           | (native_node/p2p.py; in a tab browser/node/p2p_glue.py)                    |

A driver whose trainer stops without a result (cancelled, crashed) calls `training_stopped` so
that the round is trained again when it is offered again.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from shared import chunk_submit
from shared.autotune import continue_training
from shared.chunk_encode import DeltaSource, Spool, Spooled
from shared.codecs import make_codec
from shared.downlink import resolve
from shared.dp import privatize
from shared.envelope import Identity, new_nonce
from shared.errors import BadUpdate, ProtocolError
from shared.layout import TensorSlot, make_manifest, model_id
from shared.messages import (
    MAX_LOSS,
    MAX_SECONDS,
    SERVER,
    Ack,
    Challenge,
    Dht,
    Error,
    Hello,
    Message,
    Ready,
    RoundCommitted,
    RoundOpen,
    SecAgg,
    Shard,
    ShardPlan,
    Signal,
    Submit,
    ValidateRequest,
    Verdict,
    Welcome,
    sha256_hex,
)
from shared.outer import worker_momentum
from shared.overlap import Ahead
from shared.secagg.p2p import masked_ready
from shared.secagg.round import SECAGG_CODEC, SecAggClient, pack_masked
from shared.trust import ServerTrust, UntrustedServer
from shared.update_encoding import encode_update
from shared.vec import all_finite, byte_view, read_bytes, to_bytes

Event = dict[str, Any]
FATAL_CODES = {"unsupported_version"}
MAX_MESSAGE = 512 * 1024 * 1024
JOURNAL_VERSION = 1


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """The round a trainer works on (not its RoundOpen: that holds a params copy)."""

    round: int  # the protocol's field name
    params_digest: str  # theta_r the trainer started from
    max_steps: int = 1  # RoundOpen.inner_steps
    budget_s: float | None = None  # RoundOpen.time_budget_s (autotune)
    codec: str = ""  # RoundOpen.codec ("": the Welcome's)
    topk_fraction: float = 0.01  # RoundOpen.topk_fraction
    dp_clip: float | None = None  # RoundOpen.dp_clip (None: no DP)
    dp_sigma: float = 0.0  # RoundOpen.dp_sigma
    dp_participants: int = 0  # RoundOpen.dp_participants


class Resolver(Protocol):
    """RoundOpen + the params we hold (and their digest) -> this round's params; BadUpdate
    when they cannot be had from what we hold (then the participant asks for a reconnect)."""

    def __call__(self, msg: RoundOpen, held: Any, held_digest: str | None) -> Any: ...


class Participant:
    """One training participant's protocol state across connections (sans I/O)."""

    def __init__(self, identity: Identity, *, runtime: str, agent: str, device: str,
                 role: str = "trainer", pins: dict[str, str] | None = None,
                 save_pins: Callable[[dict[str, str]], None] | None = None,
                 expected_server_id: str | None = None) -> None:
        self.identity = identity
        if role not in ("trainer", "validator"):
            raise ValueError(f"role must be 'trainer' or 'validator', got {role!r}")
        self.runtime, self.agent, self.device, self.role = runtime, agent, device, role
        self.extra_features: tuple[str, ...] = ()  # more Hello features, e.g. "region=eu"
        self.validating: ValidateRequest | None = None  # the request being scored
        self.trust = ServerTrust(pins=pins, save_pins=save_pins,
                                 expected_server_id=expected_server_id, max_payload=MAX_MESSAGE)
        self.challenge: Challenge | None = None
        self.welcome: Welcome | None = None
        self.layout: tuple[TensorSlot, ...] | None = None  # from the ONNX manifest
        self.held: Any = None  # params of the last RoundOpen (base of a params delta)
        self.held_digest: str | None = None
        self.training: Job | None = None  # the round our trainer is working on
        self.residual: Any = None  # error feedback: what the codec dropped last time
        self.momentum: Any = None  # worker momentum of past deltas (Welcome.worker_momentum)
        self.codec_state: Any = None  # a stateful codec's warm start (PowerSGD's Q)
        self.last_codec: str | None = None  # the codec of the last update (codec_state's)
        self.pending: Submit | Spooled | None = None  # submitted, not yet committed
        self.pending_params: str | None = None  # params digest the pending update started from
        self.pending_ready: Ready | None = None  # p2p: our Ready for the open round
        self.rejected_round: int | None = None  # validators excluded our update of this round
        self.resolver: Resolver = resolve  # p2p nodes apply the outer step themselves
        self.secagg: SecAggClient | None = None  # runs with secure aggregation (Welcome.secagg)
        self.ahead = Ahead()  # run option overlap (shared.overlap); drivers set .supported
        self.spool: Callable[[], Spool] | None = None  # a new spool file: chunked encoding
        self.counts = {"refused_frames": 0, "submitted": 0, "accepted": 0, "duplicate": 0,
                       "errors": 0}

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    # -- connection ----------------------------------------------------------------------
    def connection_made(self) -> None:
        """A new socket: the next frame must be the server's Challenge."""
        self.challenge = None
        self.trust.reset()

    def set_layout(self, entries: Sequence[dict[str, Any] | TensorSlot]) -> None:
        """The parameter layout (the tab's ONNX manifest entries, or the native model's
        TensorSlots); with the run's model config it must hash to the Welcome's model id (else
        the trainer's model is not this run's model)."""
        if self.welcome is None:
            raise ValueError("no Welcome yet: the layout is checked against the run's model")
        slots = make_manifest(
            (e.name, tuple(e.shape), e.offset, e.length) if isinstance(e, TensorSlot)
            else (e["name"], tuple(e["shape"]), int(e["offset"]), int(e["length"]))
            for e in entries)
        got = model_id(self.welcome.model, slots)
        if got != self.welcome.model_id:
            raise ValueError(f"the ONNX graphs' layout gives model id {got[:12]}, the run's is "
                             f"{self.welcome.model_id[:12]}")
        self.layout = slots

    def receive(self, data: bytes) -> list[Event]:
        """One frame from the server -> the events it causes."""
        try:
            msg = self.trust.open(bytes(data))
        except ProtocolError as exc:
            self.counts["refused_frames"] += 1
            return [{"kind": "refused", "message": f"{exc.code}: {exc}"}]
        except UntrustedServer as exc:
            return [{"kind": "fatal", "message": str(exc)}]
        if isinstance(msg, Challenge):
            self.challenge = msg
            hello = Hello(node_id=self.node_id, public_key=self.identity.public_key.hex(),
                          challenge=msg.challenge, nonce=new_nonce(), runtime=self.runtime,
                          agent=self.agent, device=self.device, role=self.role,
                          features=",".join(("delta-params", *self.extra_features))
                          if self.role == "trainer" else "")
            return [self._send(hello)]
        if isinstance(msg, Welcome):
            return self._on_welcome(msg)
        if isinstance(msg, RoundOpen) and msg.stream_size:  # the driver fetches its chunks
            return [{"kind": "params_stream", "message": msg}]  # (shared.stream_down)
        if isinstance(msg, RoundOpen):
            return self.round_open(msg)
        if isinstance(msg, ValidateRequest):
            return self._on_validate(msg)
        if isinstance(msg, Ack):
            self.counts[msg.status] = self.counts.get(msg.status, 0) + 1
            return [{"kind": "ack", "round": msg.round, "status": msg.status,
                     "digest": msg.digest}]
        if isinstance(msg, RoundCommitted):
            return self._on_committed(msg)
        if isinstance(msg, Signal):  # e.g. the server peer's answer to our offer
            return [{"kind": "signal", "from": msg.node_id, "signal": msg.kind, "data": msg.data}]
        if isinstance(msg, Dht):  # peer discovery: for the driver's DHT carrier
            return [{"kind": "dht", "message": msg}]
        if isinstance(msg, ShardPlan | Shard):
            return [{"kind": "p2p", "message": msg}]
        if isinstance(msg, SecAgg):
            return self._on_secagg(msg)
        if isinstance(msg, Error):
            return self._on_error(msg)
        return []

    def round_open(self, msg: RoundOpen) -> list[Event]:
        """A whole RoundOpen: one frame's, or a streamed one's once all its chunks are in
        (shared.stream_down: the driver checked them against the signed manifest)."""
        return self._hold(msg) if self.role == "validator" else self._on_round_open(msg)

    def _on_error(self, msg: Error) -> list[Event]:
        self.counts["errors"] += 1
        kind = "fatal" if msg.code in FATAL_CODES else "error"
        events: list[Event] = [{"kind": kind, "code": msg.code, "message": msg.message,
                                "round": msg.round}]
        if msg.code == "update_rejected" and msg.round is not None:
            # validators excluded our update for this round: the server refuses any other
            # for it, so neither resubmit it nor train the round again at its next attempt
            self.rejected_round = msg.round
            if self.pending is not None and self.pending.round == msg.round:
                self.pending = self.pending_params = None
                events.append({"kind": "journal", "entry": None})
        return events

    # -- handlers ------------------------------------------------------------------------
    def frame(self, msg: Message) -> bytes:
        """`msg` with a fresh nonce, signed as this participant for the connection's run
        (Submit payloads zstd'd when it pays). Drivers use it for the frames they build
        themselves (a p2p node's Shard and Signal frames)."""
        if self.challenge is None:
            raise ProtocolError("no Challenge on this connection yet: nothing can be signed")
        msg = dataclasses.replace(msg, nonce=new_nonce())  # type: ignore[type-var]
        sign = self.identity.signer(run_id=self.challenge.run_id,
                                    round_=getattr(msg, "round", -1), msg_type=msg.TYPE,
                                    nonce=msg.nonce)
        return msg.to_frame(sign=sign, compress=isinstance(msg, Submit))

    def _send(self, msg: Message) -> Event:
        return {"kind": "send", "msg_type": msg.TYPE, "frame": self.frame(msg)}

    def _on_welcome(self, msg: Welcome) -> list[Event]:
        events: list[Event] = []
        prev = self.welcome
        if prev is not None and (prev.run_id != msg.run_id or prev.model_id != msg.model_id
                                 or prev.codec != msg.codec
                                 or prev.codec_params != msg.codec_params
                                 or prev.error_feedback != msg.error_feedback
                                 or prev.worker_momentum != msg.worker_momentum):
            self.residual = None  # explicit: a new run, model or codec starts a fresh residual
            self.momentum = None  # ... and a fresh worker momentum
            self.codec_state = None  # ... and a fresh PowerSGD warm start
            if prev.model_id != msg.model_id:
                self.layout = None
            self.pending_ready = None
            if self.pending is not None:
                self.pending = self.pending_params = None
                events.append({"kind": "journal", "entry": None})
        elif self.pending is not None and self.pending.run_id != msg.run_id:
            self.pending = self.pending_params = None  # journaled for another run
            events.append({"kind": "journal", "entry": None})
        self.welcome = msg
        self.ahead.on_welcome(msg.overlap)
        if not msg.secagg:
            self.secagg = None
        elif self.secagg is None or self.secagg.run_id != msg.run_id:
            self.secagg = SecAggClient(self.identity, msg.run_id)
        return [*events, {"kind": "welcome", "run_id": msg.run_id, "node_id": msg.node_id,
                 "server_id": self.trust.server_id, "model": msg.model,
                 "model_id": msg.model_id, "data": msg.data, "shard": msg.shard,
                 "n_shards": msg.n_shards, "codec": msg.codec, "codec_params": msg.codec_params,
                 "error_feedback": msg.error_feedback, "n_params": msg.n_params,
                 "transport": msg.transport, "rtc_timeout_s": msg.rtc_timeout_s}]

    def _on_round_open(self, msg: RoundOpen) -> list[Event]:
        try:  # full params, or the changes against the params we hold
            theta = self.resolver(msg, self.held, self.held_digest)
        except BadUpdate as exc:
            self.held = self.held_digest = None
            events: list[Event] = self._stop_training()  # the full params reopen the round
            return [*events, {"kind": "reconnect", "message": f"round {msg.round}: {exc}"}]
        self.held, self.held_digest = theta, msg.params_digest
        if msg.round == self.rejected_round:
            return []  # excluded from this round: wait for the next one
        ready = self.pending_ready
        if ready is not None and ready.round == msg.round \
                and self.pending_params == msg.params_digest:
            return [self._send(ready)]  # p2p: tell the server again that our update is ready
        if (self.pending is not None and self.pending.round == msg.round
                and self.pending_params == msg.params_digest):
            # trained before the reconnect (or reload): resubmit as is, never retrain
            return [{"kind": "resubmit", "round": msg.round, "params": to_bytes(theta),
                     "params_digest": msg.params_digest, "digest": self.pending.digest},
                    self._send(self.pending) if isinstance(self.pending, Submit)
                    else {"kind": "stream", "update": self.pending}]
        if self.training is not None and self.training.round == msg.round \
                and self.training.params_digest == msg.params_digest:
            return []  # a retry of the round we are already training
        events = self._stop_training()
        merge = self.ahead.takes(msg.round)  # overlap: steps run ahead become this round's
        if not merge:
            self.ahead.drop()
        self.training = Job(round=msg.round, params_digest=msg.params_digest,
                            max_steps=msg.inner_steps, budget_s=msg.time_budget_s,
                            codec=msg.codec, topk_fraction=msg.topk_fraction,
                            dp_clip=msg.dp_clip, dp_sigma=msg.dp_sigma,
                            dp_participants=msg.dp_participants)
        events.append({"kind": "train", "round": msg.round, "attempt": msg.attempt,
                       "params": to_bytes(theta), "params_digest": msg.params_digest,
                       "steps": msg.inner_steps, "lr": msg.inner_lr,
                       "batch_size": msg.batch_size, "deadline_s": msg.deadline_s,
                       "time_budget_s": msg.time_budget_s, **({"merge": True} if merge else {})})
        return events

    def keep_training(self, round_: int, done: int, elapsed_s: float) -> bool:
        """Whether the trainer of `round_`, `done` steps and `elapsed_s` seconds in, runs
        another step: at most the round's `inner_steps` and, when the RoundOpen set a time
        budget, while the next step ends within it (shared.autotune.continue_training). Every
        driver asks before each step; False too when the round is no longer being trained."""
        job = self.training
        if job is None or job.round != round_:
            return False
        return continue_training(done=done, max_steps=job.max_steps, elapsed_s=elapsed_s,
                                 budget_s=job.budget_s)

    def round_codec(self, job: Job) -> Any:
        """The codec of `job`'s update: the RoundOpen's (autotune) or else the Welcome's."""
        assert self.welcome is not None
        if not job.codec:
            return make_codec(self.welcome.codec, **self.welcome.codec_params)
        if job.codec == "topk":
            return make_codec("topk", fraction=job.topk_fraction)
        return make_codec(job.codec)

    def signal(self, kind: str, data: str, to: str = SERVER) -> list[Event]:
        """A signed WebRTC Signal (offer, candidate, bye) to the server's peer or a node."""
        if self.welcome is None:
            return []
        return [self._send(Signal(run_id=self.welcome.run_id, node_id=self.node_id, to=to,
                                  kind=kind, data=data))]

    # -- validator role ------------------------------------------------------------------
    def _hold(self, msg: RoundOpen) -> list[Event]:
        """A validator keeps theta_r (full params: its Hello asks for no deltas)."""
        try:
            theta = resolve(msg, self.held, self.held_digest)
        except BadUpdate as exc:
            self.held = self.held_digest = None
            return [{"kind": "reconnect", "message": f"round {msg.round}: {exc}"}]
        self.held, self.held_digest = theta, msg.params_digest
        return [{"kind": "round", "round": msg.round, "params_digest": msg.params_digest}]

    def _on_validate(self, msg: ValidateRequest) -> list[Event]:
        """Hand the candidates to the scorer (the tab's inference graph); `verdict` answers."""
        if self.role != "validator":
            return [{"kind": "refused", "message": "a validation request, but this node trains"}]
        if self.held is None or msg.params_digest != self.held_digest:
            return [{"kind": "refused", "message": f"validation request for params "
                     f"{msg.params_digest[:12]}, this node holds {str(self.held_digest)[:12]}"}]
        self.validating = msg
        return [{"kind": "validate", "round": msg.round, "params": to_bytes(self.held),
                 "codec": msg.codec, "length": msg.length,
                 "candidates": [{"node_id": c["node_id"], "digest": c["digest"],
                                 "payload": msg.candidate_payload(i)}
                                for i, c in enumerate(msg.candidates)]}]

    def verdict(self, round_: int, base_loss: float | None,
                losses: Sequence[float | None]) -> list[Event]:
        """The scorer's held-out losses of theta_r and of theta_r - Delta_i (None: the
        candidate did not decode or its loss is not finite) -> a signed Verdict."""
        req, welcome = self.validating, self.welcome
        if req is None or req.round != round_ or welcome is None:
            return []
        if len(losses) != len(req.candidates):
            raise ValueError(f"{len(losses)} losses for {len(req.candidates)} candidates")
        self.validating = None

        scores = [{"node_id": c["node_id"], "digest": c["digest"], "loss": loss_or_none(v)}
                  for c, v in zip(req.candidates, losses, strict=True)]
        self.counts["judged"] = self.counts.get("judged", 0) + len(scores)
        return [self._send(Verdict(run_id=welcome.run_id, round=round_, node_id=self.node_id,
                                   base_loss=loss_or_none(base_loss), scores=scores))]

    def _on_committed(self, msg: RoundCommitted) -> list[Event]:
        events: list[Event] = []
        if self.pending_ready is not None and self.pending_ready.round <= msg.round:
            self.pending_ready = None
        if self.pending is not None and self.pending.round <= msg.round:
            self.pending = self.pending_params = None
            events.append({"kind": "journal", "entry": None})
        if self.training is not None and self.training.round <= msg.round:
            events += self._stop_training()  # committed without us: stop at once
        if self.secagg is not None:
            self.secagg.committed(msg.round)
        events.append({"kind": "committed", "round": msg.round, "eval_loss": msg.eval_loss,
                       "n_updates": msg.n_updates, "params_digest": msg.params_digest,
                       "final": msg.final})
        return events

    def _stop_training(self) -> list[Event]:
        if self.training is None:
            return []
        job, self.training = self.training, None
        return [{"kind": "cancel", "round": job.round}]

    def training_stopped(self, round_: int) -> None:
        """The driver's trainer stopped `round_` without a result (cancelled or failed): the
        round is trained again if it is offered again."""
        if self.training is not None and self.training.round == round_:
            self.training = None

    # -- the trainer's result ------------------------------------------------------------
    def submit(self, round_: int, delta_bytes: bytes | memoryview | DeltaSource, *,
               train_loss: float | None, samples: int, compute_s: float) -> list[Event]:
        """The trainer finished `round_`: `delta_bytes` is its pseudo-gradient theta_r - theta_i
        (float32 LE; a byte view of the trainer's array will do: it is read, never kept).
        Encode it (+ residual), sign it and send it."""
        job, welcome = self.training, self.welcome
        if job is None or job.round != round_ or welcome is None or self.held is None:
            return []  # the round moved on while we trained: nothing to send
        codec = self.round_codec(job)
        if codec.name != self.last_codec:  # a codec's warm start (PowerSGD) is its own
            self.codec_state, self.last_codec = None, codec.name
        if getattr(codec, "needs_layout", False) and self.layout is None:
            return [{"kind": "fatal", "message": f"codec {codec.name} needs the layout"}]
        if not isinstance(delta_bytes, bytes | bytearray | memoryview):  # Δ by chunks
            if chunk_submit.why_not(self, job, codec) is None and (  # shared.chunk_submit
                    out := chunk_submit.submit_chunked(
                        self, job, codec, delta_bytes, train_loss=train_loss,
                        samples=samples, compute_s=compute_s)) is not None:
                return out
            delta_bytes = byte_view(delta_bytes.whole())
        delta = read_bytes(delta_bytes)  # read only (encoded, masked or clipped into new)
        if len(delta) != len(self.held):
            raise ValueError(f"trainer returned {len(delta)} values, the round has "
                             f"{len(self.held)}")
        if not all_finite(delta):
            self.training = None
            return [{"kind": "error", "code": "not_finite",
                     "message": f"round {round_}: training diverged (NaN/inf); not submitted"}]
        if job.dp_clip is not None:  # client-level DP first: all that follows is
            # post-processing of the clipped, noised update (momentum, residual, codec)
            delta, norm = privatize(delta, clip=job.dp_clip, sigma=job.dp_sigma,
                                    participants=max(1, job.dp_participants))
            delta_bytes = to_bytes(delta)
            self.counts["dp_clipped"] = self.counts.get("dp_clipped", 0) + (norm > job.dp_clip)
            self.counts["dp_updates"] = self.counts.get("dp_updates", 0) + 1
        if self.secagg is not None:  # secure aggregation: only ever sent masked
            self.training = None
            meta = {"train_loss": loss_or_none(train_loss), "samples": int(samples),
                    "compute_s": seconds(compute_s), "params_digest": job.params_digest}
            return self._masked(self.secagg.hold(round_, delta, meta), round_)
        if welcome.transport == "p2p":  # the update stays here; the shard owners get it
            return self._ready(job, delta_bytes, train_loss, samples, compute_s)
        if welcome.worker_momentum > 0:  # send the momentum of our deltas, not the delta
            delta = self.momentum = worker_momentum(self.momentum, delta,
                                                    welcome.worker_momentum)
        try:
            payload = self._encode(codec, delta, welcome.error_feedback)
        except ValueError as exc:  # e.g. PowerSGD's encoder needs numpy (not in Pyodide)
            self.training = None
            return [{"kind": "fatal", "message": f"this node cannot encode codec "
                                                 f"{codec.name}: {exc}"}]
        msg = Submit(run_id=welcome.run_id, round=round_, node_id=self.node_id,
                     nonce=new_nonce(), codec=codec.name, length=len(delta),
                     digest=sha256_hex(payload), train_loss=loss_or_none(train_loss),
                     samples=int(samples), compute_s=seconds(compute_s), payload=payload)
        self.pending, self.pending_params = msg, job.params_digest
        self.training = None
        self.counts["submitted"] += 1
        return [{"kind": "journal", "entry": self.journal_entry()}, self._send(msg),
                *self.ahead.after_submit(round_)]

    def _on_secagg(self, msg: SecAgg) -> list[Event]:
        """A secure-aggregation stage from the server (shared.secagg.round): our answer, and
        the masked update once the shares are in and the trainer is done."""
        if self.secagg is None or self.welcome is None:
            return [{"kind": "refused", "message": "a secagg stage, but this run has none"}]
        try:
            out, masked = self.secagg.on_message(msg.stage, msg.round, msg.payload,
                                                 self.welcome.n_params)
        except ProtocolError as exc:
            return [{"kind": "error", "code": exc.code, "message": f"secagg {msg.stage}: {exc}",
                     "round": msg.round}]
        events = [self._send(SecAgg(run_id=self.welcome.run_id, round=msg.round,
                                    node_id=self.node_id, stage=stage, payload=body))
                  for stage, body in out]
        return events + self._masked(masked, msg.round)

    def _masked(self, masked: Any, round_: int) -> list[Event]:
        """The masked update as a Submit of codec `secagg`, journaled like any other."""
        client = self.secagg
        if masked is None or client is None or client.held is None or self.welcome is None:
            return [{"kind": "secagg", "round": round_, "stage": "waiting"}]
        if self.welcome.transport == "p2p":  # the masked words go to shard owners instead
            return self._masked_ready(masked, round_)
        meta, payload = client.held.meta, pack_masked(masked)
        msg = Submit(run_id=self.welcome.run_id, round=round_, node_id=self.node_id,
                     nonce=new_nonce(), codec=SECAGG_CODEC, length=self.welcome.n_params,
                     digest=sha256_hex(payload), train_loss=meta["train_loss"],
                     samples=meta["samples"], compute_s=meta["compute_s"], payload=payload)
        self.pending, self.pending_params = msg, meta["params_digest"]
        self.counts["submitted"] += 1
        plain = client.last_plain[1] if client.last_plain else b""
        return [{"kind": "secagg", "round": round_, "stage": "masked", "plain": plain},
                {"kind": "journal", "entry": self.journal_entry()}, self._send(msg)]

    def _masked_ready(self, masked: Any, round_: int) -> list[Event]:
        """`p2p` with secagg: keep the masked words for the owners (shared.secagg.p2p)."""
        client, welcome = self.secagg, self.welcome
        assert client is not None
        assert client.held is not None
        assert welcome is not None
        msg = masked_ready(welcome.run_id, round_, self.node_id, masked, client.held.meta)
        self.pending_ready, self.pending_params = msg, client.held.meta["params_digest"]
        self.counts["submitted"] += 1
        plain = client.last_plain[1] if client.last_plain else b""
        return [{"kind": "secagg", "round": round_, "stage": "masked", "plain": plain},
                {"kind": "ready", "round": round_, "delta": masked.payload}, self._send(msg)]

    def _ready(self, job: Job, delta_bytes: bytes | memoryview, train_loss: float | None,
               samples: int, compute_s: float) -> list[Event]:
        """`p2p` runs: keep the raw update for the shard owners, tell the server it is ready."""
        assert self.welcome is not None
        raw = bytes(delta_bytes)
        msg = Ready(run_id=self.welcome.run_id, round=job.round, node_id=self.node_id,
                    length=len(raw) // 4, digest=sha256_hex(raw),
                    train_loss=loss_or_none(train_loss), samples=int(samples),
                    compute_s=seconds(compute_s))
        self.pending_ready, self.pending_params = msg, job.params_digest
        self.training = None
        self.counts["submitted"] += 1
        return [{"kind": "ready", "round": job.round, "delta": raw}, self._send(msg)]

    def _encode(self, codec: Any, delta: Any, error_feedback: bool) -> bytes:
        """Codec payload of delta (+ residual); keeps the new residual and codec state."""
        residual, self.residual = self.residual, None  # given up: the new one is written in it
        payload, self.residual, self.codec_state = encode_update(
            codec, delta, residual=residual if error_feedback else None,
            state=self.codec_state, error_feedback=error_feedback, layout=self.layout,
            consume=True)
        return payload

    # -- reload: the pending update survives in the tab's storage -----------------------
    def journal_entry(self) -> str | None:
        if self.pending is None:
            return None
        if isinstance(self.pending, Spooled):
            return chunk_submit.journal_entry(self.pending, self.pending_params)
        fields = {f.name: getattr(self.pending, f.name)
                  for f in dataclasses.fields(self.pending) if f.name != "payload"}
        return json.dumps({"version": JOURNAL_VERSION, "params_digest": self.pending_params,
                           "submit": fields,
                           "payload": base64.b64encode(self.pending.payload).decode()})

    def restore(self, entry: str) -> bool:
        """Take back an update journaled before a reload (resubmitted, never retrained, when
        its round and params come again). False when the entry is unusable."""
        try:
            doc = json.loads(entry)
            key = "spooled" if isinstance(doc, dict) and "spooled" in doc else "submit"
            if not isinstance(doc, dict) or doc.get("version") != JOURNAL_VERSION \
                    or doc[key]["node_id"] != self.node_id:
                return False
            submit = chunk_submit.restore(doc) if key == "spooled" else \
                Submit(**doc["submit"], payload=base64.b64decode(doc["payload"]))
        except (ValueError, KeyError, TypeError, ProtocolError, OSError):
            return False
        if submit is None:  # its spool file is gone or changed
            return False
        self.pending, self.pending_params = submit, str(doc["params_digest"])
        return True


def round_to(x: float, digits: int = 4) -> float:
    return float(round(x, digits))


def loss_or_none(v: float | None) -> float | None:
    """A loss for display as the schema takes it: None when not finite or beyond MAX_LOSS
    (an honest node whose training diverged still sends its update, without a loss)."""
    if v is None or not math.isfinite(v) or abs(v) > MAX_LOSS:
        return None
    return float(v)


def seconds(x: float) -> float:
    """Compute time as the schema takes it: rounded, within [0, MAX_SECONDS]."""
    return round_to(min(max(float(x), 0.0), float(MAX_SECONDS))) if math.isfinite(x) else 0.0
