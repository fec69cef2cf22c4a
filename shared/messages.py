"""Control messages: frozen, keyword-only dataclasses, one wire type id each.

A message travels as one frame (shared.frame): every field but `payload` goes into the JSON
header, `payload` (when the class has one) is the frame's binary payload. `from_frame`
checks every field's type and range and raises `MessageError` naming the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import secrets
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Union

from shared.errors import BadUpdate, FrameError, MessageError
from shared.frame import (
    DEFAULT_MAX_PAYLOAD,
    FLAG_ZSTD,
    Frame,
    decode_frame,
    encode_frame,
    zstd_frame_size,
)
from shared.platform import zstd


def new_nonce() -> str:
    """16 random bytes, hex: the nonce every signed frame carries."""
    return secrets.token_hex(16)

ROLES = ("trainer", "validator")
TRANSPORTS = ("ws", "star", "p2p")
SHARD_KINDS = ("part", "result", "ack")  # ack: streamed p2p receipts (shared.p2p_stream)
SIGNAL_KINDS = ("offer", "answer", "candidate", "bye", "path")
# secure aggregation's key stages (shared.secagg.round): server -> node "open", "roster",
# "ciphertexts", "shares", "unmask"; node -> server "advert", "ciphertexts", "bundle", "unmask"
SECAGG_STAGES = ("open", "advert", "roster", "ciphertexts", "bundle", "shares", "unmask",
                 "accuse")  # accuse: p2p owner -> server, a bad signed slice (shared.secagg.p2p)
# one ICE server URL (Welcome.ice_servers): scheme, host[:port], an optional transport
ICE_URL = re.compile(r"(stuns?|turns?):[A-Za-z0-9.\-\[\]:]{1,255}(\?transport=(udp|tcp))?")
SERVER = "server"  # Signal.to / Signal.node_id naming the server's own WebRTC peer
MAX_CANDIDATES = 4096
HEX64 = re.compile(r"[0-9a-f]{64}")
HEXSTR = re.compile(r"(?:[0-9a-f]{2})+")
NONCE = re.compile(r"[0-9a-f]{32}")
MAX_TEXT = 8192
COMPRESS_MIN = 1024
# Numeric limits of the schema (docs/protocol.md, "Field types and ranges"). Integers stay
# below 2^53 so that a JS number holds them exactly (and SQLite's INTEGER, i64, always does);
# floats are finite and bounded so that a sum or mean over any number of them stays finite.
MAX_INT = 2**53 - 1  # rounds, attempts, counters
MAX_INDEX = 2**31 - 1  # lengths, shard indices, steps, sizes
MAX_SAMPLES = 10**12  # samples one node trains on in one round
MAX_SECONDS = 10**7  # durations (about 115 days)
MAX_LOSS = 1e9  # |loss| in nats: larger is a broken run, refused
MAX_LR = 1e6  # learning rates
MAX_DP = 1e6  # DP clip norm and noise multiplier
# the codecs a RoundOpen may assign a node for its round ("": the Welcome's codec)
ROUND_CODECS = ("", "raw32", "fp16", "bf16", "int8-block", "int4-block", "topk")


def spec(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False,
         **kwargs: Any) -> Any:
    """A numeric field with its range, checked at decode (`Message.from_header`): the
    dataclass field's metadata {"min", "max"} and, for an open end, "min_exclusive" /
    "max_exclusive" (true). The schema's one statement of a field's range: docs/protocol.md's
    table is checked against it and scripts/gen_messages_js.py carries it to the tab."""
    meta: dict[str, Any] = {"min": lo, "max": hi}
    if lo_open:
        meta["min_exclusive"] = True
    if hi_open:
        meta["max_exclusive"] = True
    return field(metadata=meta, **kwargs)


def in_range(meta: Mapping[str, Any], value: float) -> bool:
    """Whether `value` lies in the range a field's metadata states (no range: True)."""
    if "min" not in meta:
        return True
    lo, hi = meta["min"], meta["max"]
    above: bool = value > lo if meta.get("min_exclusive") else value >= lo
    below: bool = value < hi if meta.get("max_exclusive") else value <= hi
    return above and below


def range_text(meta: Mapping[str, Any]) -> str:
    """A field's range as docs/protocol.md writes it: "[0, 1)", "(0, 10000000]", or "—"."""
    if "min" not in meta:
        return "—"

    def num(v: float) -> str:
        if v == MAX_INT:
            return "2^53-1"
        if v == MAX_INDEX:
            return "2^31-1"
        k = round(math.log10(abs(v))) if v else 0
        if abs(v) >= 10**6 and abs(v) == 10**k:  # 10^7, -10^9
            return ("-" if v < 0 else "") + f"10^{k}"
        return str(int(v)) if v == int(v) else str(v)

    return (("(" if meta.get("min_exclusive") else "[") + f"{num(meta['min'])}, "
            f"{num(meta['max'])}" + (")" if meta.get("max_exclusive") else "]"))


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """Content hash used everywhere: SHA-256 hex of the raw bytes."""
    return hashlib.sha256(data).hexdigest()


class Message:
    """Mixin: frame conversion and type checking for the dataclasses below."""

    __slots__ = ()
    TYPE: ClassVar[int]
    nonce: str  # every message has one (a field of each dataclass below): signers read it

    def to_frame(self, *, sign: Callable[[bytes], bytes] | None = None,
                 compress: bool = False) -> bytes:
        """Encode as one frame; `sign` adds the signature trailer (shared.envelope); with
        `compress` the payload is zstd-compressed when that saves at least 5%."""
        header: dict[str, Any] = {}
        payload = b""
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name == "payload":
                payload = value
            else:
                header[f.name] = value
        flags = 0
        z = zstd() if compress and len(payload) >= COMPRESS_MIN else None
        if z is not None:
            packed = z.compress(payload)
            if len(packed) <= 0.95 * len(payload):
                payload, flags = packed, FLAG_ZSTD
        return encode_frame(self.TYPE, header, payload, flags=flags, sign=sign)

    @classmethod
    def from_header(cls, header: dict[str, Any], payload: bytes) -> Message:
        hints = typing.get_type_hints(cls)
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(header) - (set(names) - {"payload"}))
        if unknown:
            raise MessageError(f"{cls.__name__}: unknown field(s) {unknown}", field=unknown[0])
        kwargs: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            name = f.name
            if name == "payload":
                kwargs[name] = payload
                continue
            if name not in header:
                raise MessageError(f"{cls.__name__}: missing field {name!r}", field=name)
            value = _check_type(cls.__name__, name, header[name], hints[name])
            if isinstance(value, int | float) and not isinstance(value, bool) \
                    and not in_range(f.metadata, value):
                raise MessageError(f"{cls.__name__}.{name}: {str(value)[:40]} is out of range "
                                   f"{range_text(f.metadata)}", field=name)
            kwargs[name] = value
        if "payload" not in names and payload:
            raise MessageError(f"{cls.__name__} carries no payload", field="payload")
        if "nonce" in kwargs:
            _nonce(cls.__name__, kwargs["nonce"])
        return cls(**kwargs)


def _check_type(cls_name: str, name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(o for o in options if o is not type(None))
        origin = typing.get_origin(hint)
    ok: bool
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok:
            try:
                value = float(value)
            except OverflowError:  # an integer literal too large for a float
                ok = False
            ok = ok and math.isfinite(value)
    elif hint is str:
        ok = isinstance(value, str) and len(value) <= MAX_TEXT
    elif origin is dict:
        ok = isinstance(value, dict)
    elif origin is list:
        ok = isinstance(value, list) and all(isinstance(v, dict) for v in value)
    else:  # pragma: no cover - a programming error, not a wire error
        raise TypeError(f"unsupported field type {hint!r}")
    if not ok:
        raise MessageError(f"{cls_name}.{name}: expected a finite "
                           f"{getattr(hint, '__name__', hint)}, got {type(value).__name__}"
                           f" {str(value)[:40]}", field=name)
    return value


def _require(cond: bool, cls: str, name: str, what: str) -> None:
    if not cond:
        raise MessageError(f"{cls}.{name}: {what}", field=name)


def _hex64(cls: str, name: str, value: str) -> None:
    _require(bool(HEX64.fullmatch(value)), cls, name, "must be 64 lowercase hex digits")


def _nonce(cls: str, value: str) -> None:
    _require(bool(NONCE.fullmatch(value)), cls, "nonce", "must be 32 lowercase hex digits")


@dataclass(frozen=True, kw_only=True, slots=True)
class Hello(Message):
    """Node -> server, first frame on a connection: who I am."""

    TYPE: ClassVar[int] = 1
    node_id: str  # SHA-256 of public_key, 64 hex digits; stable across reconnects
    public_key: str  # ML-DSA-65 public key, hex (1952 bytes)
    challenge: str  # the connection's Challenge.challenge, echoed (binds the signature)
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex (shared.envelope)
    runtime: str  # "native" or "browser"
    agent: str  # software name/version, free text
    device: str  # "cpu", "cuda:0", "webgpu", ...
    role: str = "trainer"  # "trainer" (trains, submits) or "validator" (scores updates)
    features: str = ""  # comma-separated optional capabilities: "delta-params"

    def __post_init__(self) -> None:
        _require(self.role in ROLES, "Hello", "role", f"must be one of {list(ROLES)}")
        _hex64("Hello", "node_id", self.node_id)
        _require(bool(HEXSTR.fullmatch(self.public_key)), "Hello", "public_key",
                 "must be lowercase hex")
        _hex64("Hello", "challenge", self.challenge)
        _nonce("Hello", self.nonce)
        _require(self.runtime in ("native", "browser"), "Hello", "runtime",
                 "must be 'native' or 'browser'")


@dataclass(frozen=True, kw_only=True, slots=True)
class Welcome(Message):
    """Server -> node, answer to Hello: the run and the node's place in it."""

    TYPE: ClassVar[int] = 2
    run_id: str  # the run this connection belongs to
    node_id: str  # echo of the node's id
    model: dict[str, Any]  # full model config (ml.zoo.model_config)
    model_id: str  # hash of model config + parameter layout
    data: dict[str, Any]  # data spec (ml.data.DataSpec.to_dict)
    shard: int = spec(0, MAX_INDEX)  # this node's shard index
    n_shards: int = spec(1, MAX_INDEX)  # number of shards the training set is split into
    codec: str  # registry name of the codec updates must use
    codec_params: dict[str, Any]  # that codec's parameters (shared.codecs.make_codec)
    error_feedback: bool  # keep the codec's residual and add it to the next update
    n_params: int = spec(1, MAX_INDEX)  # length of the flat parameter vector
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex (shared.envelope)
    transport: str = "ws"  # "ws": updates on this socket; "star": over a WebRTC data channel
    # star: relay updates on this socket if not open by then
    rtc_timeout_s: float = spec(0, MAX_SECONDS, lo_open=True, default=10.0)
    # beta: send m = beta m + (1-beta) delta (shared.outer)
    worker_momentum: float = spec(0, 1, hi_open=True, default=0.0)
    # the run's STUN/TURN servers for this node's peer connections: [{"urls", "username",
    # "credential"}] (empty strings for STUN); TURN credentials are short-lived and minted for
    # this node (server.turn: the TURN REST API scheme of coturn's use-auth-secret)
    ice_servers: list[dict[str, Any]] = field(default_factory=list, metadata={"entries": {
        "urls": {"type": "str"}, "username": {"type": "str"}, "credential": {"type": "str"}}})
    # secure aggregation (shared.secagg.round): updates go masked, never in the clear
    secagg: bool = False
    # streamed updates (shared.stream): an update whose payload exceeds this many bytes goes
    # as a StreamSubmit and Chunks of this size (0: always one Submit)
    stream_chunk: int = spec(0, MAX_INDEX, default=0)
    # overlapped rounds (shared.overlap): train round t+1 from the local params while round t
    # is aggregated, then merge its progress onto theta_{t+1}
    overlap: bool = False

    def __post_init__(self) -> None:
        _hex64("Welcome", "model_id", self.model_id)
        _entries(self, "ice_servers")
        for s in self.ice_servers:
            _require(bool(ICE_URL.fullmatch(s["urls"])), "Welcome", "ice_servers",
                     "urls must be one stun:, stuns:, turn: or turns: URL")
        _require(0 <= self.worker_momentum < 1, "Welcome", "worker_momentum",
                 "must be in [0, 1)")
        _require(self.n_shards >= 1, "Welcome", "n_shards", "must be >= 1")
        _require(0 <= self.shard < self.n_shards, "Welcome", "shard", "must be < n_shards")
        _require(self.n_params >= 1, "Welcome", "n_params", "must be >= 1")
        _require(self.transport in TRANSPORTS, "Welcome", "transport",
                 f"must be one of {list(TRANSPORTS)}")


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundOpen(Message):
    """Server -> node: round `round` is open; payload = the global params (raw float32 LE)."""

    TYPE: ClassVar[int] = 3
    run_id: str  # the run
    round: int = spec(0, MAX_INT)  # outer round number, from 0
    attempt: int = spec(0, MAX_INT)  # 0, then +1 each time the round is retried below quorum
    params_digest: str  # sha256 of the payload (the content hash of theta_r)
    # seconds from now until the server stops collecting
    deadline_s: float = spec(0, MAX_SECONDS, lo_open=True)
    inner_steps: int = spec(1, MAX_INDEX)  # H: inner optimizer steps to run
    inner_lr: float = spec(0, MAX_LR, lo_open=True)  # inner AdamW learning rate
    batch_size: int = spec(1, MAX_INDEX)  # inner batch size
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex (shared.envelope)
    base_digest: str | None = None  # None: payload = theta_r; else the changes against it
    with_momentum: bool = False  # p2p: payload = theta_r then the outer momentum (2 x n)
    # autotune (shared.autotune): train as many steps as fit in this many seconds, at most
    # inner_steps (null: exactly inner_steps)
    time_budget_s: float | None = spec(0, MAX_SECONDS, lo_open=True, default=None)
    codec: str = ""  # this node's update codec for the round (ROUND_CODECS; "": the Welcome's)
    topk_fraction: float = spec(0, 1, lo_open=True, default=0.01)  # share kept by codec topk
    # client-level DP (shared.dp): clip the update to this L2 norm (null: no DP this round)
    dp_clip: float | None = spec(0, MAX_DP, lo_open=True, default=None)
    dp_sigma: float = spec(0, MAX_DP, default=0.0)  # noise multiplier of the round's sum
    dp_participants: int = spec(0, MAX_INDEX, default=0)  # m: the round's sampled nodes (0: 1)
    # streamed downlink (shared.stream_down): 0, or the payload is the SHA-256 manifest of a
    # payload of this many bytes that follows in ParamsChunk frames
    stream_size: int = spec(0, MAX_INT, default=0)
    chunk_bytes: int = spec(0, MAX_INDEX, default=0)  # bytes per ParamsChunk (0: not streamed)
    payload: bytes = field(repr=False)  # theta_r as float32 LE, or shared.downlink changes

    def __post_init__(self) -> None:
        _require(self.round >= 0, "RoundOpen", "round", "must be >= 0")
        _require(self.codec in ROUND_CODECS, "RoundOpen", "codec",
                 f"must be one of {ROUND_CODECS}")
        _require(self.inner_steps >= 1, "RoundOpen", "inner_steps", "must be >= 1")
        _require(self.batch_size >= 1, "RoundOpen", "batch_size", "must be >= 1")
        _require(self.deadline_s > 0 and math.isfinite(self.deadline_s), "RoundOpen",
                 "deadline_s", "must be a positive number")
        if self.stream_size:  # the manifest; the payload is checked once it is whole
            _require(self.chunk_bytes >= 1024, "RoundOpen", "chunk_bytes", "must be >= 1024")
            _require(len(self.payload) == 32 * -(-self.stream_size // self.chunk_bytes),
                     "RoundOpen", "payload", "the manifest must be one SHA-256 per chunk")
            if self.base_digest is not None:
                _hex64("RoundOpen", "base_digest", self.base_digest)
            return
        _require(self.chunk_bytes == 0, "RoundOpen", "chunk_bytes",
                 "must be 0 when stream_size is 0")
        if self.base_digest is not None:  # checked once applied (shared.downlink)
            _hex64("RoundOpen", "base_digest", self.base_digest)
            return
        _require(len(self.payload) % (8 if self.with_momentum else 4) == 0, "RoundOpen",
                 "payload", "not float32 sized")
        params = self.payload[:len(self.payload) // 2] if self.with_momentum else self.payload
        if sha256_hex(params) != self.params_digest:
            raise BadUpdate("RoundOpen: params digest does not match payload",
                            field="params_digest")


@dataclass(frozen=True, kw_only=True, slots=True)
class Submit(Message):
    """Node -> server: my pseudo-gradient for `round` (payload encoded with `codec`)."""

    TYPE: ClassVar[int] = 4
    run_id: str  # the run this update belongs to
    round: int = spec(0, MAX_INT)  # outer round it was trained for
    node_id: str  # sender; must match the connection's Hello
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex; never reused
    codec: str  # registry name of the codec of `payload`
    length: int = spec(1, MAX_INDEX)  # number of float32 values the payload decodes to
    digest: str  # sha256 of `payload`, uncompressed (part of the idempotency key)
    train_loss: float | None = spec(-MAX_LOSS, MAX_LOSS)  # mean inner training loss, for display
    samples: int = spec(0, MAX_SAMPLES)  # training samples consumed this round
    compute_s: float = spec(0, MAX_SECONDS)  # seconds spent in forward/backward/optimizer
    payload: bytes = field(repr=False)  # encoded pseudo-gradient theta_r - theta_i

    def __post_init__(self) -> None:
        _hex64("Submit", "node_id", self.node_id)
        _hex64("Submit", "digest", self.digest)
        _nonce("Submit", self.nonce)
        _require(self.round >= 0, "Submit", "round", "must be >= 0")
        _require(self.length >= 1, "Submit", "length", "must be >= 1")
        _require(self.samples >= 0, "Submit", "samples", "must be >= 0")
        if sha256_hex(self.payload) != self.digest:
            raise BadUpdate("Submit: digest does not match payload", field="digest")


@dataclass(frozen=True, kw_only=True, slots=True)
class Ack(Message):
    """Server -> node: your update for `round` was taken (or already had been)."""

    TYPE: ClassVar[int] = 5
    round: int = spec(0, MAX_INT)  # round of the acknowledged update
    digest: str  # digest of the acknowledged update
    status: str  # "accepted" or "duplicate"
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex (shared.envelope)

    def __post_init__(self) -> None:
        _hex64("Ack", "digest", self.digest)
        _require(self.status in ("accepted", "duplicate"), "Ack", "status",
                 "must be 'accepted' or 'duplicate'")


@dataclass(frozen=True, kw_only=True, slots=True)
class Error(Message):
    """Either way: what was wrong with the last frame. The connection stays open."""

    TYPE: ClassVar[int] = 6
    code: str  # machine-readable code (shared.errors.ERROR_CODES)
    message: str  # human-readable explanation
    field: str | None  # offending field, when there is one
    round: int | None = spec(-1, MAX_INT)  # round the refused message was for, when known
    nonce: str = dataclasses.field(default_factory=new_nonce)  # 16 random bytes, hex

    def __post_init__(self) -> None:
        # the round of a refused frame is echoed only when it is one (never an attacker's
        # out-of-range number, which no receiver would accept and no signature can hold)
        if self.round is not None and (isinstance(self.round, bool)
                                       or not isinstance(self.round, int)
                                       or not -1 <= self.round <= MAX_INT):
            object.__setattr__(self, "round", None)


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundCommitted(Message):
    """Server -> node: round `round` was committed; theta_{round+1} is the new global."""

    TYPE: ClassVar[int] = 7
    round: int = spec(-1, MAX_INT)  # the committed round (-1: none yet)
    # validation loss of the new global params (nats)
    eval_loss: float | None = spec(-MAX_LOSS, MAX_LOSS)
    n_updates: int = spec(0, MAX_INT)  # updates aggregated
    params_digest: str  # content hash of the new global params
    final: bool  # the run reached its last round: nodes may leave
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex (shared.envelope)

    def __post_init__(self) -> None:
        _hex64("RoundCommitted", "params_digest", self.params_digest)


@dataclass(frozen=True, kw_only=True, slots=True)
class Challenge(Message):
    """Server -> node, first frame on a connection: sign your Hello over this."""

    TYPE: ClassVar[int] = 8
    run_id: str  # the run (the ML-DSA context string of every signature)
    challenge: str  # 32 random bytes, hex, fresh per connection
    server_public_key: str  # the server's ML-DSA-65 public key, hex: it signs every frame
    protocol_version: int = spec(0, 255)  # the server's protocol version
    agent: str  # server software name/version
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex (shared.envelope)

    def __post_init__(self) -> None:
        _hex64("Challenge", "challenge", self.challenge)
        _require(bool(HEXSTR.fullmatch(self.server_public_key)), "Challenge",
                 "server_public_key", "must be lowercase hex")


def _entries(msg: Message, name: str) -> None:
    """Each entry of list field `name`: exactly the keys its metadata "entries" lists, each
    {"type": "str" | "int" | "float" (null allowed)} and for numbers "min"/"max"."""
    cls = type(msg).__name__
    items: list[dict[str, Any]] = getattr(msg, name)
    keys: dict[str, dict[str, Any]] = next(
        f for f in fields(msg) if f.name == name).metadata["entries"]  # type: ignore[arg-type]
    _require(len(items) <= MAX_CANDIDATES, cls, name, f"at most {MAX_CANDIDATES} entries")
    for i, item in enumerate(items):
        _require(set(item) == set(keys), cls, name, f"entry {i} must have keys {sorted(keys)}")
        for key, meta in keys.items():
            v, kind = item[key], meta["type"]
            if kind == "float":
                ok = v is None or (isinstance(v, int | float) and not isinstance(v, bool)
                                   and math.isfinite(v) and in_range(meta, v))
            elif kind == "int":
                ok = isinstance(v, int) and not isinstance(v, bool) and in_range(meta, v)
            else:
                ok = isinstance(v, str)
            _require(ok, cls, name, f"entry {i}: {key} must be {kind}"
                     + (f" in {range_text(meta)}" if "min" in meta else ""))
            if key in ("node_id", "digest"):
                _hex64(cls, name, v)


@dataclass(frozen=True, kw_only=True, slots=True)
class ValidateRequest(Message):
    """Server -> validator node: score these candidate updates for `round` against theta_r
    (sent in that round's RoundOpen). The payload is the candidates' encoded payloads, one
    after another; entry i is bytes [offset, offset + size) and must hash to its digest."""

    TYPE: ClassVar[int] = 9
    run_id: str  # the run
    round: int = spec(0, MAX_INT)  # the round the candidates were submitted for
    params_digest: str  # theta_r the candidates are relative to
    codec: str  # the run's codec (every candidate uses it)
    # values each candidate decodes to (= the model's parameter count)
    length: int = spec(1, MAX_INDEX)
    # [{"node_id", "digest", "offset", "size"}]
    candidates: list[dict[str, Any]] = field(metadata={"entries": {
        "node_id": {"type": "str"}, "digest": {"type": "str"},
        "offset": {"type": "int", "min": 0, "max": MAX_INT},
        "size": {"type": "int", "min": 0, "max": MAX_INT}}})
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex (shared.envelope)
    payload: bytes = field(repr=False)  # the candidates' encoded payloads, concatenated

    def __post_init__(self) -> None:
        _hex64("ValidateRequest", "params_digest", self.params_digest)
        _require(self.round >= 0, "ValidateRequest", "round", "must be >= 0")
        _require(self.length >= 1, "ValidateRequest", "length", "must be >= 1")
        _entries(self, "candidates")
        for c in self.candidates:
            _require(c["offset"] >= 0 and c["size"] >= 0
                     and c["offset"] + c["size"] <= len(self.payload), "ValidateRequest",
                     "candidates", "an entry lies outside the payload")

    def candidate_payload(self, i: int) -> bytes:
        c = self.candidates[i]
        data = self.payload[c["offset"]:c["offset"] + c["size"]]
        if sha256_hex(data) != c["digest"]:
            raise BadUpdate(f"ValidateRequest: candidate {i} does not match its digest",
                            field="candidates")
        return data


@dataclass(frozen=True, kw_only=True, slots=True)
class Verdict(Message):
    """Validator node -> server: held-out losses of theta_r and of theta_r - Delta_i."""

    TYPE: ClassVar[int] = 10
    run_id: str  # the run
    round: int = spec(0, MAX_INT)  # the round of the ValidateRequest answered
    node_id: str  # the validator
    # held-out loss of theta_r (None: not finite)
    base_loss: float | None = spec(-MAX_LOSS, MAX_LOSS)
    # [{"node_id", "digest", "loss"}] (loss None: not finite)
    scores: list[dict[str, Any]] = field(metadata={"entries": {
        "node_id": {"type": "str"}, "digest": {"type": "str"},
        "loss": {"type": "float", "min": -MAX_LOSS, "max": MAX_LOSS}}})
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex (shared.envelope)

    def __post_init__(self) -> None:
        _hex64("Verdict", "node_id", self.node_id)
        _require(self.round >= 0, "Verdict", "round", "must be >= 0")
        _entries(self, "scores")


@dataclass(frozen=True, kw_only=True, slots=True)
class Signal(Message):
    """WebRTC signaling through the server, either way. A node signs it as itself (the
    server refuses any other `node_id`); the server forwards it, signed by the server, with
    `node_id` = the authenticated sender. `to` is a node id or "server" (the server's own
    peer, the aggregator of the `star` transport)."""

    TYPE: ClassVar[int] = 11
    run_id: str  # the run
    node_id: str  # the sender (or "server")
    to: str  # the receiver: a node id or "server"
    # "offer", "answer", "candidate" (trickled ICE), "bye", or "path" (node -> server: the
    # candidate pair type a node's connection to a peer settled on, for /api/peers)
    kind: str
    # SDP (offer / answer), the candidate as JSON, "" (bye), {"peer", "pair"} as JSON (path)
    data: str
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex (shared.envelope)

    def __post_init__(self) -> None:
        for name in ("node_id", "to"):
            value = getattr(self, name)
            if value != SERVER:
                _hex64("Signal", name, value)
        _require(self.kind in SIGNAL_KINDS, "Signal", "kind", f"must be one of "
                 f"{list(SIGNAL_KINDS)}")
        _nonce("Signal", self.nonce)


@dataclass(frozen=True, kw_only=True, slots=True)
class Ready(Message):
    """Node -> server (`p2p`): I trained `round`; my update (raw float32, `length` values,
    SHA-256 `digest`) stays with me and goes to the shard owners the ShardPlan names."""

    TYPE: ClassVar[int] = 12
    run_id: str  # the run
    round: int = spec(0, MAX_INT)  # outer round it was trained for
    node_id: str  # sender; must match the connection's Hello
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex; never reused
    length: int = spec(1, MAX_INDEX)  # float32 values in the update
    digest: str  # sha256 of the raw update (part of the idempotency key)
    train_loss: float | None = spec(-MAX_LOSS, MAX_LOSS)  # mean inner training loss, for display
    samples: int = spec(0, MAX_SAMPLES)  # training samples consumed this round
    compute_s: float = spec(0, MAX_SECONDS)  # seconds spent training

    def __post_init__(self) -> None:
        _hex64("Ready", "node_id", self.node_id)
        _hex64("Ready", "digest", self.digest)
        _nonce("Ready", self.nonce)
        _require(self.round >= 0, "Ready", "round", "must be >= 0")
        _require(self.length >= 1, "Ready", "length", "must be >= 1")
        _require(self.samples >= 0, "Ready", "samples", "must be >= 0")


RESULT_CODECS = ("raw32", "fp16", "bf16")  # how p2p owners may send reduced shards (shared.codecs)


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardPlan(Message):
    """Server -> the round's members (`p2p`): who reduces which shard (shared.p2p.Plan as a
    dict), with which rule; a revision replaces the previous plan of the round."""

    TYPE: ClassVar[int] = 13
    run_id: str  # the run
    round: int = spec(0, MAX_INT)  # the round being reduced
    plan: dict[str, Any]  # shared.p2p.Plan.to_dict()
    rule: str  # coordinate-wise aggregation rule (shared.p2p.COORDINATE_RULES)
    byzantine_fraction: float = spec(0, 1, hi_open=True)  # f = estimate_f(len(members), this, rule)
    result_codec: str = "raw32"  # how owners encode reduced shards (RESULT_CODECS)
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex (shared.envelope)

    def __post_init__(self) -> None:
        _require(self.round >= 0, "ShardPlan", "round", "must be >= 0")
        _require(self.result_codec in RESULT_CODECS, "ShardPlan", "result_codec",
                 f"must be one of {RESULT_CODECS}")
        _require(0 <= self.byzantine_fraction < 1, "ShardPlan", "byzantine_fraction",
                 "must be in [0, 1)")


@dataclass(frozen=True, kw_only=True, slots=True)
class Shard(Message):
    """`p2p` shard traffic: a member's slice of a shard to its owner ("part"), or an owner's
    reduced shard ("result") to the server or to a member. Peer to peer over a data channel,
    or through the server (which forwards it re-signed, `node_id` = the sender)."""

    TYPE: ClassVar[int] = 14
    run_id: str  # the run
    round: int = spec(0, MAX_INT)  # the round being reduced
    node_id: str  # the sender ("server": the combined aggregate to a group's aggregator)
    to: str  # a node id or "server"
    kind: str  # "part", "result" or "ack" (streamed runs: an owner's receipt of a part)
    shard: int = spec(0, MAX_INDEX)  # shard index in the plan
    revision: int = spec(0, MAX_INT)  # the plan revision it was sent under
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex (shared.envelope)
    payload: bytes = field(repr=False)  # part: float32 LE; result: a result_codec payload

    def __post_init__(self) -> None:
        if self.node_id != SERVER:  # "server": the combined aggregate to a group aggregator
            _hex64("Shard", "node_id", self.node_id)
        if self.to != SERVER:
            _hex64("Shard", "to", self.to)
        _require(self.kind in SHARD_KINDS, "Shard", "kind", f"must be one of {SHARD_KINDS}")
        _require(self.round >= 0 and self.shard >= 0 and self.revision >= 0, "Shard", "shard",
                 "round, shard and revision must be >= 0")
        _require(len(self.payload) > 0 and (self.kind != "part" or len(self.payload) % 4 == 0),
                 "Shard", "payload", "empty, or a part not float32 sized")


@dataclass(frozen=True, kw_only=True, slots=True)
class SecAgg(Message):
    """Secure aggregation's key stages (shared.secagg.round), node <-> server: the server
    relays what participants send each other. The payload's stage messages carry their own
    ML-DSA signatures (shared.secagg.messages), so a relay cannot forge them."""

    TYPE: ClassVar[int] = 15
    run_id: str  # the run
    round: int = spec(0, MAX_INT)  # the round being aggregated
    node_id: str  # the sender: a node id, or "server"
    stage: str  # SECAGG_STAGES
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex (shared.envelope)
    payload: bytes = field(repr=False)  # canonical JSON of the stage's body

    def __post_init__(self) -> None:
        if self.node_id != SERVER:
            _hex64("SecAgg", "node_id", self.node_id)
        _require(self.stage in SECAGG_STAGES, "SecAgg", "stage",
                 f"must be one of {list(SECAGG_STAGES)}")
        _require(self.round >= 0, "SecAgg", "round", "must be >= 0")
        _nonce("SecAgg", self.nonce)


DHT_MAX_PAYLOAD = 256 * 1024  # one shared.dht.wire message (a data channel's largest)


@dataclass(frozen=True, kw_only=True, slots=True)
class Dht(Message):
    """Kademlia peer discovery (shared.dht, docs/dht.md) over the control WebSocket: a node's
    DHT message to the server's own DHT node (`to` "server") or, relayed, to another node,
    which gets it re-signed by the server with `node_id` = the authenticated sender. On a data
    channel between two nodes the same frame travels unsigned (the channel says who sent it)."""

    TYPE: ClassVar[int] = 16
    run_id: str  # the run
    node_id: str  # the sender: a node id, or "server"
    to: str  # the receiver: a node id, or "server"
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex (shared.envelope)
    payload: bytes = field(repr=False)  # one shared.dht.wire message (canonical JSON)

    def __post_init__(self) -> None:
        for name in ("node_id", "to"):
            if getattr(self, name) != SERVER:
                _hex64("Dht", name, getattr(self, name))
        _nonce("Dht", self.nonce)
        _require(0 < len(self.payload) <= DHT_MAX_PAYLOAD, "Dht", "payload",
                 f"must be 1..{DHT_MAX_PAYLOAD} bytes")


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamSubmit(Message):
    """Node -> server: a Submit too large for one frame, announced with its chunk manifest
    (shared.stream); its payload then follows in `Chunk`s. Signed once, here: the manifest
    binds every chunk, `digest` the whole payload (the update's idempotency key)."""

    TYPE: ClassVar[int] = 17
    run_id: str  # the run this update belongs to
    round: int = spec(0, MAX_INT)  # outer round it was trained for
    node_id: str  # sender; must match the connection's Hello
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex; never reused
    codec: str  # registry name of the codec of the streamed payload
    length: int = spec(1, MAX_INDEX)  # number of float32 values the payload decodes to
    digest: str  # sha256 of the whole payload, uncompressed (as Submit.digest)
    size: int = spec(1, MAX_INT)  # bytes of the whole payload
    chunk_bytes: int = spec(1024, MAX_INDEX)  # bytes per chunk (the last one shorter)
    train_loss: float | None = spec(-MAX_LOSS, MAX_LOSS)  # mean inner training loss
    samples: int = spec(0, MAX_SAMPLES)  # training samples consumed this round
    compute_s: float = spec(0, MAX_SECONDS)  # seconds spent in forward/backward/optimizer
    payload: bytes = field(repr=False)  # the manifest: each chunk's 32-byte SHA-256 in order

    def __post_init__(self) -> None:
        _hex64("StreamSubmit", "node_id", self.node_id)
        _hex64("StreamSubmit", "digest", self.digest)
        _nonce("StreamSubmit", self.nonce)
        _require(self.chunk_bytes >= 1024, "StreamSubmit", "chunk_bytes", "must be >= 1024")
        _require(self.size >= 1, "StreamSubmit", "size", "must be >= 1")
        # one entry per chunk: checked against size and chunk_bytes by the receiver
        # (shared.stream.check_manifest, bad_chunk)
        _require(len(self.payload) > 0 and len(self.payload) % 32 == 0, "StreamSubmit",
                 "payload", "the manifest must be 32-byte SHA-256 entries")


@dataclass(frozen=True, kw_only=True, slots=True)
class Chunk(Message):
    """Node -> server, unsigned: chunk `index` of the streamed update (`round`, `digest`)
    its sender announced in a StreamSubmit on this connection; checked against its manifest
    entry. Unsigned because the signed manifest already binds its bytes."""

    TYPE: ClassVar[int] = 18
    round: int = spec(0, MAX_INT)  # the update's round
    digest: str  # the update's StreamSubmit.digest
    index: int = spec(0, MAX_INDEX)  # chunk number, from 0
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex
    payload: bytes = field(repr=False)  # the chunk's bytes

    def __post_init__(self) -> None:
        _hex64("Chunk", "digest", self.digest)
        _require(self.index >= 0, "Chunk", "index", "must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class Resume(Message):
    """Server -> node, answer to a StreamSubmit: send the update's chunks from `next` on
    (0: a new transfer; more: it resumes after the last chunk verified before a reconnect)."""

    TYPE: ClassVar[int] = 19
    round: int = spec(0, MAX_INT)  # the update's round
    digest: str  # the update's StreamSubmit.digest
    next: int = spec(0, MAX_INDEX)  # first chunk to send
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex (shared.envelope)

    def __post_init__(self) -> None:
        _hex64("Resume", "digest", self.digest)


@dataclass(frozen=True, kw_only=True, slots=True)
class ParamsChunk(Message):
    """Server -> node, unsigned: chunk `index` of a streamed RoundOpen payload
    (shared.stream_down), checked against the manifest the signed RoundOpen carries."""

    TYPE: ClassVar[int] = 20
    round: int = spec(0, MAX_INT)  # the RoundOpen's round
    digest: str  # the stream's id: SHA-256 of the RoundOpen's manifest (its payload)
    index: int = spec(0, MAX_INDEX)  # chunk number, from 0
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex
    payload: bytes = field(repr=False)  # the chunk's bytes

    def __post_init__(self) -> None:
        _hex64("ParamsChunk", "digest", self.digest)
        _require(self.index >= 0, "ParamsChunk", "index", "must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class ParamsFetch(Message):
    """Node -> server, answer to a streamed RoundOpen: send its chunks from `next` on (0: a
    new download; more: it resumes after the last chunk verified before a reconnect)."""

    TYPE: ClassVar[int] = 21
    run_id: str  # the run
    round: int = spec(0, MAX_INT)  # the RoundOpen's round
    node_id: str  # sender; must match the connection's Hello
    digest: str  # the stream's id: SHA-256 of the RoundOpen's manifest
    next: int = spec(0, MAX_INDEX)  # first chunk to send
    nonce: str = field(default_factory=new_nonce)  # 16 random bytes, hex (shared.envelope)

    def __post_init__(self) -> None:
        _hex64("ParamsFetch", "node_id", self.node_id)
        _hex64("ParamsFetch", "digest", self.digest)


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (Hello, Welcome, RoundOpen, Submit, Ack, Error, RoundCommitted, Challenge,
                ValidateRequest, Verdict, Signal, Ready, ShardPlan, Shard, SecAgg, Dht,
                StreamSubmit, Chunk, Resume, ParamsChunk, ParamsFetch)
}
assert len(MESSAGE_TYPES) == 21, "duplicate message type id"


_TYPE_TEXT = {int: "int", float: "float", str: "string", bool: "bool", dict: "object",
              list: "list", bytes: "bytes"}


def _type_text(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType) and type(None) in args:
        return _type_text(next(a for a in args if a is not type(None))) + " or null"
    return _TYPE_TEXT[typing.get_origin(hint) or hint]


def schema_rows() -> list[tuple[str, str, str, str]]:
    """(message, field, type, range) of every header field, in wire-type-id and field order;
    a list field's entry keys follow it as `field[].key`. docs/protocol.md's "Field types and
    ranges" table lists exactly these rows (tests/test_protocol_doc.py)."""
    rows: list[tuple[str, str, str, str]] = []
    for _, cls in sorted(MESSAGE_TYPES.items()):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name == "payload":
                continue
            rows.append((cls.__name__, f.name, _type_text(hints[f.name]), range_text(f.metadata)))
            for key, meta in f.metadata.get("entries", {}).items():
                kind = {"str": "string", "int": "int", "float": "float or null"}[meta["type"]]
                rows.append((cls.__name__, f"{f.name}[].{key}", kind, range_text(meta)))
    return rows


def decode_message(data: bytes | bytearray | memoryview, *,
                   max_payload: int = DEFAULT_MAX_PAYLOAD) -> Message:
    """Frame bytes -> message. Raises only `ProtocolError` subclasses."""
    frame = decode_frame(data, max_payload=max_payload)
    return message_from_frame(frame, max_payload=max_payload)


def message_from_frame(frame: Frame, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> Message:
    """Frame -> message: inflates a ZSTD payload (to at most `max_payload`), checks fields."""
    cls = MESSAGE_TYPES.get(frame.msg_type)
    if cls is None:
        raise MessageError(f"unknown message type {frame.msg_type}", field="msg_type")
    payload = frame.payload
    if frame.compressed:
        z = zstd()
        if z is None:
            raise FrameError("zstd payloads are not supported by this peer", field="flags")
        size = zstd_frame_size(payload)
        if size != len(payload):
            raise FrameError(f"the payload holds {len(payload) - size} bytes after its zstd "
                             "frame: exactly one frame is allowed", field="payload")
        try:
            payload = z.decompress(payload, max_payload)
        except ValueError as exc:
            raise FrameError(f"bad zstd payload: {exc}", field="payload") from exc
    try:
        return cls.from_header(frame.header, payload)
    except TypeError as exc:  # defensive: dataclass construction refused arguments
        raise MessageError(f"{cls.__name__}: {exc}") from exc
