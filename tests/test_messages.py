"""Tests for shared.messages: typed control messages and the golden wire vectors."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest

from shared.errors import (
    ERROR_CODES,
    BadUpdate,
    FrameError,
    MessageError,
    ProtocolError,
)
from shared.frame import FIXED_HEADER, MAGIC, PROTOCOL_VERSION, canonical_json, encode_frame
from shared.messages import (
    MAX_TEXT,
    MESSAGE_TYPES,
    Ack,
    Challenge,
    Chunk,
    Dht,
    Error,
    Hello,
    Message,
    ParamsChunk,
    ParamsFetch,
    Ready,
    Resume,
    RoundCommitted,
    RoundOpen,
    SecAgg,
    Shard,
    ShardPlan,
    Signal,
    StreamSubmit,
    Submit,
    ValidateRequest,
    Verdict,
    Welcome,
    decode_message,
    message_from_frame,
    sha256_hex,
)

NODE = "0123456789abcdef" * 4
PARAMS = struct.pack("<3f", 1.0, -2.5, 0.125)
UPDATE = struct.pack("<2f", 0.5, -0.25)
TESTDATA = Path(__file__).resolve().parent.parent / "shared" / "testdata"


def header_of(msg: Message) -> dict[str, Any]:
    """The JSON header fields of a message (everything but the payload)."""
    return {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)  # type: ignore[arg-type]
            if f.name != "payload"}


def frame_of(msg_type: int, header: dict[str, Any], payload: bytes = b"") -> bytes:
    """A frame with exactly this header, built past the message classes' own checks."""
    head = canonical_json(header)
    return FIXED_HEADER.pack(MAGIC, PROTOCOL_VERSION, msg_type, 0, len(head),
                             len(payload)) + head + payload


def raw_head_frame(msg_type: int, head: bytes, payload: bytes = b"") -> bytes:
    return FIXED_HEADER.pack(MAGIC, PROTOCOL_VERSION, msg_type, 0, len(head),
                             len(payload)) + head + payload


FIXED_NONCE = "9a" * 16  # messages draw a random nonce unless given one


def hello(**kw: Any) -> Hello:
    base: dict[str, Any] = {"node_id": NODE, "public_key": "ab" * 16, "challenge": "cd" * 32,
                            "nonce": "ef" * 16, "runtime": "native", "agent": "test/1",
                            "device": "cpu"}
    return Hello(**{**base, **kw})


def welcome(**kw: Any) -> Welcome:
    base: dict[str, Any] = {"run_id": "run-1", "node_id": NODE,
                            "model": {"kind": "mlp", "width": 8}, "model_id": "ab" * 32,
                            "data": {"name": "markov"}, "shard": 1, "n_shards": 2,
                            "codec": "raw32", "codec_params": {}, "error_feedback": True,
                            "n_params": 3, "nonce": FIXED_NONCE}
    return Welcome(**{**base, **kw})


def round_open(**kw: Any) -> RoundOpen:
    payload = kw.pop("payload", PARAMS)
    base: dict[str, Any] = {"run_id": "run-1", "round": 2, "attempt": 0,
                            "params_digest": sha256_hex(payload), "deadline_s": 30.5,
                            "inner_steps": 4, "inner_lr": 0.001, "batch_size": 8,
                            "nonce": FIXED_NONCE}
    return RoundOpen(**{**base, **kw}, payload=payload)


def submit(**kw: Any) -> Submit:
    payload = kw.pop("payload", UPDATE)
    base: dict[str, Any] = {"run_id": "run-1", "round": 2, "node_id": NODE,
                            "nonce": "01" * 16, "codec": "raw32",
                            "length": 2, "digest": sha256_hex(payload), "train_loss": 1.25,
                            "samples": 32, "compute_s": 0.5}
    return Submit(**{**base, **kw}, payload=payload)


def ack(**kw: Any) -> Ack:
    return Ack(**{"round": 2, "digest": sha256_hex(UPDATE), "status": "accepted",
                  "nonce": FIXED_NONCE, **kw})


def error(**kw: Any) -> Error:
    return Error(**{"code": "bad_update", "message": "nope", "field": "digest", "round": 2,
                    "nonce": FIXED_NONCE, **kw})


def committed(**kw: Any) -> RoundCommitted:
    return RoundCommitted(**{"round": 2, "eval_loss": 1.5, "n_updates": 3,
                             "params_digest": sha256_hex(PARAMS), "final": False,
                             "nonce": FIXED_NONCE, **kw})


def challenge(**kw: Any) -> Challenge:
    return Challenge(**{"run_id": "run-1", "challenge": "cd" * 32, "server_public_key": "ef" * 8,
                        "protocol_version": 1, "nonce": FIXED_NONCE,
                        "agent": "server/1", **kw})


def validate_request(**kw: Any) -> ValidateRequest:
    payload = kw.pop("payload", UPDATE + UPDATE[:5])
    base: dict[str, Any] = {
        "run_id": "run-1", "round": 2, "params_digest": sha256_hex(PARAMS), "codec": "raw32",
        "length": 2, "nonce": FIXED_NONCE,
        "candidates": [{"node_id": NODE, "digest": sha256_hex(UPDATE), "offset": 0,
                        "size": len(UPDATE)},
                       {"node_id": "77" * 32, "digest": sha256_hex(UPDATE[:5]),
                        "offset": len(UPDATE), "size": 5}]}
    return ValidateRequest(**{**base, **kw}, payload=payload)


def verdict(**kw: Any) -> Verdict:
    return Verdict(**{"run_id": "run-1", "round": 2, "node_id": "77" * 32, "base_loss": 2.5,
                      "scores": [{"node_id": NODE, "digest": sha256_hex(UPDATE), "loss": 2.25},
                                 {"node_id": "88" * 32, "digest": "99" * 32, "loss": None}],
                      "nonce": FIXED_NONCE, **kw})


def signal(**kw: Any) -> Signal:
    return Signal(**{"run_id": "run-1", "node_id": NODE, "to": "server", "kind": "offer",
                     "data": "v=0", "nonce": FIXED_NONCE, **kw})


def ready(**kw: Any) -> Ready:
    return Ready(**{"run_id": "run-1", "round": 2, "node_id": NODE, "nonce": FIXED_NONCE,
                    "length": 2, "digest": sha256_hex(UPDATE), "train_loss": 0.5,
                    "samples": 32, "compute_s": 0.25, **kw})


def shard_plan(**kw: Any) -> ShardPlan:
    plan = {"round": 2, "n_params": 2, "members": [NODE], "owners": [[NODE]], "revision": 0}
    return ShardPlan(**{"run_id": "run-1", "round": 2, "plan": plan, "rule": "median",
                        "byzantine_fraction": 0.2, "nonce": FIXED_NONCE, **kw})


def shard(**kw: Any) -> Shard:
    payload = kw.pop("payload", UPDATE[:8] if len(UPDATE) >= 8 else b"\0" * 8)
    return Shard(**{"run_id": "run-1", "round": 2, "node_id": NODE, "to": "77" * 32,
                    "kind": "part", "shard": 0, "revision": 0, "nonce": FIXED_NONCE, **kw},
                 payload=payload)


def secagg(**kw: Any) -> SecAgg:
    return SecAgg(**{"run_id": "run-1", "round": 2, "node_id": NODE, "stage": "advert",
                     "nonce": FIXED_NONCE, **kw}, payload=kw.pop("payload", b"{}"))


def dht(**kw: Any) -> Dht:
    return Dht(**{"run_id": "run-1", "node_id": NODE, "to": "server", "nonce": FIXED_NONCE,
                  **kw}, payload=kw.pop("payload", b'{"type":"ping"}'))


def stream_submit(**kw: Any) -> StreamSubmit:
    return StreamSubmit(**{"run_id": "run-1", "round": 2, "node_id": NODE, "nonce": FIXED_NONCE,
                           "codec": "raw32", "length": 2, "digest": sha256_hex(UPDATE),
                           "size": len(UPDATE), "chunk_bytes": 1024, "train_loss": 0.5,
                           "samples": 32, "compute_s": 0.25, **kw},
                        payload=kw.pop("payload", hashlib.sha256(UPDATE).digest()))


def chunk(**kw: Any) -> Chunk:
    return Chunk(**{"round": 2, "digest": sha256_hex(UPDATE), "index": 0,
                    "nonce": FIXED_NONCE, **kw}, payload=kw.pop("payload", UPDATE))


def resume(**kw: Any) -> Resume:
    return Resume(**{"round": 2, "digest": sha256_hex(UPDATE), "next": 0,
                     "nonce": FIXED_NONCE, **kw})


def params_chunk(**kw: Any) -> ParamsChunk:
    return ParamsChunk(**{"round": 2, "digest": sha256_hex(UPDATE), "index": 0,
                          "nonce": FIXED_NONCE, **kw}, payload=kw.pop("payload", PARAMS))


def params_fetch(**kw: Any) -> ParamsFetch:
    return ParamsFetch(**{"run_id": "run-1", "round": 2, "node_id": NODE,
                          "digest": sha256_hex(UPDATE), "next": 0, "nonce": FIXED_NONCE, **kw})


def streamed_round_open() -> RoundOpen:
    """A RoundOpen whose payload is the manifest of 1025 bytes in chunks of 1024
    (shared.stream_down): two SHA-256 entries; params_digest is checked once whole."""
    return round_open(payload=bytes(64), params_digest=sha256_hex(PARAMS), stream_size=1025,
                      chunk_bytes=1024)


ALL = [hello(), welcome(), round_open(), submit(), ack(), error(), committed(), challenge(),
       validate_request(), verdict(), signal(), ready(), shard_plan(), shard(), secagg(),
       dht(), stream_submit(), chunk(), resume(), params_chunk(), params_fetch(),
       streamed_round_open()]


# -- round trips -----------------------------------------------------------------------------
def test_every_type_is_covered() -> None:
    assert {type(m) for m in ALL} == set(MESSAGE_TYPES.values())
    assert sorted(MESSAGE_TYPES) == list(range(1, len(MESSAGE_TYPES) + 1))


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    data = msg.to_frame()
    assert data[5] == msg.TYPE
    back = decode_message(data)
    assert type(back) is type(msg)
    assert back == msg
    assert back.to_frame() == data  # canonical: re-encoding gives the same bytes


@pytest.mark.parametrize("msg", [
    error(field=None, round=None),
    committed(eval_loss=None),
    committed(final=True),
    submit(train_loss=None),
    hello(runtime="browser", agent="ünïcødé ✓"),
], ids=lambda m: type(m).__name__)
def test_round_trip_optional_and_edge_values(msg: Message) -> None:
    back = decode_message(msg.to_frame())
    assert back == msg
    for name, value in header_of(msg).items():
        assert getattr(back, name) == value
        assert type(getattr(back, name)) is type(value)


def test_payload_travels_outside_the_header() -> None:
    data = submit().to_frame()
    assert data.endswith(UPDATE)
    assert b"payload" not in data[:-len(UPDATE)]


def test_int_accepted_for_float_field() -> None:
    header = header_of(round_open())
    header["deadline_s"] = 30
    msg = decode_message(frame_of(RoundOpen.TYPE, header, PARAMS))
    assert isinstance(msg, RoundOpen)
    assert msg.deadline_s == 30.0
    assert type(msg.deadline_s) is float


def test_max_payload_is_passed_through() -> None:
    data = round_open().to_frame()
    assert decode_message(data, max_payload=len(PARAMS)) == round_open()
    with pytest.raises(FrameError):
        decode_message(data, max_payload=len(PARAMS) - 1)


def test_messages_are_frozen() -> None:
    msg = hello()
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.agent = "x"  # type: ignore[misc]


def test_error_codes_are_known() -> None:
    assert len(set(ERROR_CODES)) == len(ERROR_CODES)
    assert {"bad_frame", "frame_too_large", "unsupported_version", "bad_message",
            "bad_update", "wrong_round", "conflicting_update"} <= set(ERROR_CODES)


# -- field checks on the wire ---------------------------------------------------------------
@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
def test_missing_field(msg: Message) -> None:
    payload = getattr(msg, "payload", b"")
    for name in header_of(msg):
        header = header_of(msg)
        del header[name]
        with pytest.raises(MessageError) as info:
            decode_message(frame_of(msg.TYPE, header, payload))
        assert info.value.field == name
        assert "missing" in str(info.value)
        assert name in str(info.value)


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
def test_unknown_field(msg: Message) -> None:
    header = {**header_of(msg), "surprise": 1}
    with pytest.raises(MessageError) as info:
        decode_message(frame_of(msg.TYPE, header, getattr(msg, "payload", b"")))
    assert info.value.field == "surprise"
    assert "unknown" in str(info.value)


def test_shard_plan_result_codec_and_shard_payload_sizes_are_checked() -> None:
    msg = shard_plan(result_codec="fp16")
    with pytest.raises(MessageError) as info:  # only element-wise float codecs
        decode_message(frame_of(msg.TYPE, {**header_of(msg), "result_codec": "int8-block"}))
    assert info.value.field == "result_codec"
    part = shard(payload=b"\0" * 8)
    with pytest.raises(MessageError) as info:  # a part is float32 values
        decode_message(frame_of(part.TYPE, header_of(part), b"\0" * 7))
    assert info.value.field == "payload"
    result = shard(kind="result", to="server", payload=b"\x01\0\x3c")  # fp16: any size
    assert decode_message(result.to_frame()) == result


@pytest.mark.parametrize("msg", [round_open(), submit()], ids=lambda m: type(m).__name__)
def test_payload_named_in_header_is_an_unknown_field(msg: Message) -> None:
    # "payload" is not a header field; a header that carries one must not be silently dropped
    header = {**header_of(msg), "payload": "00"}
    with pytest.raises(MessageError) as info:
        decode_message(frame_of(msg.TYPE, header, msg.payload))  # type: ignore[attr-defined]
    assert info.value.field == "payload"


@pytest.mark.parametrize(("msg", "name", "value"), [
    (submit(), "round", True),  # bool is not an int
    (submit(), "samples", False),
    (submit(), "round", "2"),  # str is not an int
    (submit(), "length", 2.0),  # float is not an int
    (submit(), "round", None),  # None only where the field is optional
    (submit(), "run_id", 5),  # int is not a str
    (submit(), "codec", None),
    (submit(), "compute_s", "0.5"),  # str is not a float
    (submit(), "compute_s", True),  # bool is not a float
    (submit(), "train_loss", "x"),  # optional float still has to be a float
    (hello(), "agent", ["a"]),
    (hello(), "device", {"a": 1}),
    (welcome(), "model", [1, 2]),  # list is not a dict
    (welcome(), "data", "markov"),
    (error(), "field", 3),
    (error(), "round", "2"),
    (committed(), "final", 1),  # int is not a bool
    (committed(), "final", "true"),
    (committed(), "eval_loss", [1.5]),
    (ack(), "status", 1),
    (hello(), "agent", "x" * (MAX_TEXT + 1)),  # text has a length limit
], ids=lambda v: repr(v)[:20])
def test_wrong_type(msg: Message, name: str, value: Any) -> None:
    header = {**header_of(msg), name: value}
    with pytest.raises(MessageError) as info:
        decode_message(frame_of(msg.TYPE, header, getattr(msg, "payload", b"")))
    assert info.value.code == "bad_message"
    assert info.value.field == name
    assert name in str(info.value)


def test_text_at_limit_accepted() -> None:
    msg = hello(agent="x" * MAX_TEXT)
    assert decode_message(msg.to_frame()) == msg


@pytest.mark.parametrize("node_id", [
    NODE.upper(),  # uppercase
    NODE[:-1],  # 63 digits
    NODE + "0",  # 65 digits
    "g" + NODE[1:],  # not hex
    "",
    " " + NODE[1:],
    NODE[:-1] + "\n",  # control character
    NODE + "\n",  # 64 digits plus a trailing newline
], ids=["upper", "short", "long", "not-hex", "empty", "space", "63+newline", "64+newline"])
@pytest.mark.parametrize("build", [hello, submit], ids=["Hello", "Submit"])
def test_bad_node_id(build: Any, node_id: str) -> None:
    with pytest.raises(MessageError) as info:
        build(node_id=node_id)
    assert info.value.field == "node_id"
    header = {**header_of(build()), "node_id": node_id}
    msg = build()
    with pytest.raises(MessageError) as info:
        decode_message(frame_of(msg.TYPE, header, getattr(msg, "payload", b"")))
    assert info.value.field == "node_id"
    assert "64 lowercase hex" in str(info.value)


@pytest.mark.parametrize("model_id", ["AB" * 32, "ab" * 31, "ab" * 32 + "\n"],
                         ids=["upper", "short", "64+newline"])
def test_bad_model_id(model_id: str) -> None:
    with pytest.raises(MessageError) as info:
        welcome(model_id=model_id)
    assert info.value.field == "model_id"


def test_submit_digest_mismatch_is_bad_update() -> None:
    header = {**header_of(submit()), "digest": sha256_hex(b"other")}
    with pytest.raises(BadUpdate) as info:
        decode_message(frame_of(Submit.TYPE, header, UPDATE))
    assert info.value.code == "bad_update"
    assert info.value.field == "digest"
    # a payload altered in transit is caught the same way
    tampered = bytearray(submit().to_frame())
    tampered[-1] ^= 0x01
    with pytest.raises(BadUpdate):
        decode_message(bytes(tampered))
    with pytest.raises(BadUpdate):
        submit(digest="0" * 64)


def test_submit_digest_must_be_hex64() -> None:
    with pytest.raises(MessageError) as info:
        submit(digest=sha256_hex(UPDATE).upper())
    assert info.value.field == "digest"


def test_round_open_params_digest_mismatch() -> None:
    header = {**header_of(round_open()), "params_digest": sha256_hex(b"x")}
    with pytest.raises(BadUpdate) as info:
        decode_message(frame_of(RoundOpen.TYPE, header, PARAMS))
    assert info.value.field == "params_digest"
    tampered = bytearray(round_open().to_frame())
    tampered[-2] ^= 0x80
    with pytest.raises(BadUpdate):
        decode_message(bytes(tampered))


def test_round_open_payload_must_be_float32_sized() -> None:
    with pytest.raises(MessageError) as info:
        round_open(payload=b"\x00" * 5)
    assert info.value.field == "payload"


@pytest.mark.parametrize("msg", [hello(), welcome(), ack(), error(), committed()],
                         ids=lambda m: type(m).__name__)
def test_payload_on_message_without_payload(msg: Message) -> None:
    with pytest.raises(MessageError) as info:
        decode_message(frame_of(msg.TYPE, header_of(msg), b"\x00\x01"))
    assert info.value.field == "payload"
    assert "no payload" in str(info.value)


@pytest.mark.parametrize("msg_type", [0, 22, 99, 255])
def test_unknown_message_type(msg_type: int) -> None:
    with pytest.raises(MessageError) as info:
        decode_message(encode_frame(msg_type, {}))
    assert info.value.field == "msg_type"
    assert str(msg_type) in str(info.value)


@pytest.mark.parametrize(("build", "name", "value"), [
    (hello, "runtime", "python"),
    (welcome, "n_shards", 0),
    (welcome, "shard", 2),  # == n_shards
    (welcome, "shard", -1),
    (welcome, "n_params", 0),
    (round_open, "round", -1),
    (round_open, "inner_steps", 0),
    (round_open, "batch_size", 0),
    (round_open, "deadline_s", 0.0),
    (round_open, "deadline_s", -1.0),
    (round_open, "deadline_s", float("inf")),
    (round_open, "deadline_s", float("nan")),
    (submit, "round", -1),
    (submit, "length", 0),
    (submit, "samples", -1),
    (ack, "status", "rejected"),
])
def test_range_checks(build: Any, name: str, value: Any) -> None:
    with pytest.raises(MessageError) as info:
        build(**{name: value})
    assert info.value.field == name
    if isinstance(value, float) and not math.isfinite(value):
        return  # non-finite values cannot be put in a JSON header at all
    msg = build()
    header = {**header_of(msg), name: value}
    with pytest.raises(MessageError) as info:
        decode_message(frame_of(msg.TYPE, header, getattr(msg, "payload", b"")))
    assert info.value.field == name


@pytest.mark.parametrize(("build", "name", "literal"), [
    (submit, "compute_s", b"1e400"), (submit, "train_loss", b"-1e400"),
    (round_open, "inner_lr", b"1e400"), (round_open, "deadline_s", b"1e400"),
    (committed, "eval_loss", b"-1e999"),
])
def test_float_field_overflowing_to_infinity_is_refused(build: Any, name: str,
                                                        literal: bytes) -> None:
    # JSON has no infinity, but a number too big for a double parses as inf in Python.
    msg = build()
    marker = "__FLOAT__"
    head = canonical_json({**header_of(msg), name: marker}).replace(
        json.dumps(marker).encode(), literal)
    with pytest.raises(FrameError, match="float range") as info:  # refused at the frame level
        decode_message(raw_head_frame(msg.TYPE, head, getattr(msg, "payload", b"")))
    assert info.value.field == "header"


@pytest.mark.parametrize("value", ["\ud800", {"k": "\udfff"}, ["x", {"y": 1e999}]])
def test_headers_that_cannot_be_re_encoded_are_refused(value: Any) -> None:
    head = json.dumps({**header_of(welcome()), "model": {"v": value}}, sort_keys=True,
                      separators=(",", ":")).encode()
    with pytest.raises(FrameError) as info:
        decode_message(raw_head_frame(Welcome.TYPE, head))
    assert info.value.field == "header"


@pytest.mark.parametrize(("build", "name"), [
    (submit, "compute_s"), (round_open, "deadline_s"), (committed, "eval_loss"),
])
def test_integer_too_large_for_a_float_is_a_protocol_error(build: Any, name: str) -> None:
    # decode_message promises to raise only ProtocolError subclasses
    msg = build()
    header = {**header_of(msg), name: 10**400}
    data = frame_of(msg.TYPE, header, getattr(msg, "payload", b""))
    with pytest.raises(ProtocolError) as info:
        decode_message(data)
    assert info.value.field == name


EDGE_VALUES: list[Any] = [None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -(2**64),
                          10**400, -(10**400), 0.5, -0.0, 1e308, "", "x", "\n", "0" * 64,
                          "x" * (MAX_TEXT + 1), [], [1], {}, {"a": None}]


def test_any_value_in_any_field_only_raises_protocol_errors() -> None:
    """Type-confusion matrix: every message x every field x awkward JSON values."""
    from bench.fuzz_frames import example_messages  # one of every registered type

    escaped = []
    for msg in [*ALL, *example_messages().values()]:
        payload = getattr(msg, "payload", b"")
        for name in header_of(msg):
            for value in EDGE_VALUES:
                data = frame_of(msg.TYPE, {**header_of(msg), name: value}, payload)
                try:
                    back = decode_message(data)
                except ProtocolError:
                    continue
                except Exception as exc:  # collected and reported below
                    escaped.append(f"{type(msg).__name__}.{name}={str(value)[:20]!r}: "
                                   f"{type(exc).__name__}: {exc}")
                    continue
                assert decode_message(back.to_frame()) == back
    assert escaped == []


def test_message_from_frame() -> None:
    from shared.frame import decode_frame

    frame = decode_frame(hello().to_frame())
    assert message_from_frame(frame) == hello()


# -- golden vectors --------------------------------------------------------------------------
def _golden() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((TESTDATA / "frames.json").read_text(encoding="utf-8"))
    return doc


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("make_golden", TESTDATA / "make_golden.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GOLDEN = _golden()
BY_NAME = {cls.__name__: cls for cls in MESSAGE_TYPES.values()}


def test_golden_file_shape() -> None:
    assert GOLDEN["version"] == 1
    assert {v["type"] for v in GOLDEN["valid"]} == set(BY_NAME)
    for vec in GOLDEN["valid"]:
        assert set(vec) == {"type", "msg_type", "fields", "payload_hex", "frame_hex"}
        assert vec["msg_type"] == BY_NAME[vec["type"]].TYPE
    for vec in GOLDEN["invalid"]:
        assert set(vec) == {"name", "frame_hex", "code", "field"}
        assert vec["code"] in ERROR_CODES
    assert len({v["name"] for v in GOLDEN["invalid"]}) == len(GOLDEN["invalid"])


def test_golden_file_is_up_to_date() -> None:
    gen = _load_generator()
    assert gen.render(gen.build()) == (TESTDATA / "frames.json").read_text(encoding="utf-8")


@pytest.mark.parametrize("vec", GOLDEN["valid"],
                         ids=lambda v: f"{v['type']}-{v['frame_hex'][-8:]}")
def test_golden_decode(vec: dict[str, Any]) -> None:
    msg = decode_message(bytes.fromhex(vec["frame_hex"]))
    assert type(msg).__name__ == vec["type"]
    assert header_of(msg) == vec["fields"]
    for name, value in vec["fields"].items():
        assert type(getattr(msg, name)) is type(value)
    assert getattr(msg, "payload", b"") == bytes.fromhex(vec["payload_hex"])


@pytest.mark.parametrize("vec", GOLDEN["valid"],
                         ids=lambda v: f"{v['type']}-{v['frame_hex'][-8:]}")
def test_golden_encode(vec: dict[str, Any]) -> None:
    cls = BY_NAME[vec["type"]]
    kwargs = dict(vec["fields"])
    if any(f.name == "payload" for f in dataclasses.fields(cls)):  # type: ignore[arg-type]
        kwargs["payload"] = bytes.fromhex(vec["payload_hex"])
    else:
        assert vec["payload_hex"] == ""
    assert cls(**kwargs).to_frame().hex() == vec["frame_hex"]
    # and the generic frame encoder agrees, from the plain fields
    assert encode_frame(vec["msg_type"], vec["fields"],
                        bytes.fromhex(vec["payload_hex"])).hex() == vec["frame_hex"]


@pytest.mark.parametrize("vec", GOLDEN["invalid"], ids=lambda v: v["name"])
def test_golden_invalid(vec: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_message(bytes.fromhex(vec["frame_hex"]))
    assert info.value.code == vec["code"]
    assert info.value.field == vec["field"]


# -- validation messages ------------------------------------------------------------------------
def test_validate_request_slices_candidates_and_checks_digests() -> None:
    req = validate_request()
    assert req.candidate_payload(0) == UPDATE
    assert req.candidate_payload(1) == UPDATE[:5]
    lying = validate_request(candidates=[{"node_id": NODE, "digest": "00" * 32, "offset": 0,
                                          "size": 3}])
    with pytest.raises(BadUpdate):
        lying.candidate_payload(0)


@pytest.mark.parametrize("entry", [
    {"node_id": NODE, "digest": "00" * 32, "offset": 0},  # missing size
    {"node_id": NODE, "digest": "00" * 32, "offset": 0, "size": 999},  # beyond the payload
    {"node_id": NODE, "digest": "00" * 32, "offset": -1, "size": 1},
    {"node_id": "xyz", "digest": "00" * 32, "offset": 0, "size": 1},
    {"node_id": NODE, "digest": "00" * 32, "offset": True, "size": 1},
    {"node_id": NODE, "digest": "00" * 32, "offset": 0, "size": 1, "extra": 1},
])
def test_validate_request_refuses_bad_entries(entry: dict[str, Any]) -> None:
    with pytest.raises(MessageError):
        validate_request(candidates=[entry])


@pytest.mark.parametrize("loss", [math.inf, math.nan, "1.0", True])
def test_verdict_refuses_non_finite_or_mistyped_losses(loss: Any) -> None:
    with pytest.raises(MessageError):
        verdict(scores=[{"node_id": NODE, "digest": "00" * 32, "loss": loss}])


def test_hello_role_is_checked() -> None:
    assert hello().role == "trainer"
    assert hello(role="validator").role == "validator"
    with pytest.raises(MessageError):
        hello(role="king")


@pytest.mark.parametrize("over", [{"kind": "shout"}, {"to": "someone"}, {"node_id": "x"}])
def test_signal_fields_are_checked(over: dict[str, Any]) -> None:
    with pytest.raises(MessageError):
        signal(**over)


def test_welcome_transport_is_checked() -> None:
    assert welcome().transport == "ws"
    with pytest.raises(MessageError):
        welcome(transport="pigeon")
