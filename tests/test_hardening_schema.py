"""Hostile headers at decode: every numeric field has a type and a range in the schema
(shared.messages field metadata), headers must be canonical JSON, a ZSTD payload is exactly one
zstd frame. Each refusal is a typed error naming the field."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest

from shared.errors import FrameError, MessageError
from shared.frame import FLAG_ZSTD, canonical_json, decode_frame, encode_frame
from shared.messages import (
    MAX_INT,
    MESSAGE_TYPES,
    Error,
    Submit,
    decode_message,
    in_range,
    range_text,
    sha256_hex,
)
from shared.platform import zstd

PAYLOAD = b"\x00" + b"\x00" * 16


def submit_header(**over: typing.Any) -> dict[str, typing.Any]:
    header = {"run_id": "r", "round": 0, "node_id": "ab" * 32, "nonce": "cd" * 16,
              "codec": "raw32", "length": 4, "digest": sha256_hex(PAYLOAD), "train_loss": 1.5,
              "samples": 10, "compute_s": 0.5}
    header.update(over)
    return header


def test_every_numeric_field_has_a_range() -> None:
    for cls in MESSAGE_TYPES.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            base = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or \
                [hints[f.name]]
            if base[0] in (int, float):
                assert "min" in f.metadata, (cls.__name__, f.name)
                assert "max" in f.metadata, (cls.__name__, f.name)
            for key, meta in f.metadata.get("entries", {}).items():
                assert meta["type"] == "str" or "min" in meta, (cls.__name__, f.name, key)


@pytest.mark.parametrize(("name", "value"), [
    ("samples", 10**20),  # once crashed the commit: SQLite INTEGER overflow
    ("samples", -1),
    ("samples", MAX_INT),
    ("train_loss", 1.7e308),  # two of these made the round's mean overflow to inf
    ("train_loss", -1.7e308),
    ("compute_s", -1),
    ("compute_s", 1e300),
    ("round", 2**53),
    ("round", -1),
    ("length", 2**40),
    ("length", 0),
])
def test_out_of_range_numbers_are_refused_naming_the_field(name: str, value: float) -> None:
    data = encode_frame(Submit.TYPE, submit_header(**{name: value}), PAYLOAD)
    with pytest.raises(MessageError) as err:
        decode_message(data)
    assert err.value.field == name
    assert err.value.code == "bad_message"


def test_in_range_extremes_are_accepted() -> None:
    msg = decode_message(encode_frame(Submit.TYPE, submit_header(
        samples=10**12, train_loss=-1e9, compute_s=0, round=MAX_INT), PAYLOAD))
    assert isinstance(msg, Submit)
    assert msg.samples == 10**12
    assert msg.round == MAX_INT
    msg = decode_message(encode_frame(Submit.TYPE, submit_header(train_loss=None), PAYLOAD))
    assert isinstance(msg, Submit)
    assert msg.train_loss is None


def test_list_entries_have_ranges() -> None:
    from shared.messages import Verdict

    header = {"run_id": "r", "round": 0, "node_id": "ab" * 32, "nonce": "cd" * 16,
              "base_loss": 1.0, "scores": [{"node_id": "ab" * 32, "digest": "ef" * 32,
                                            "loss": 1e300}]}
    with pytest.raises(MessageError) as err:
        decode_message(encode_frame(Verdict.TYPE, header))
    assert err.value.field == "scores"


def test_range_text_and_open_ends() -> None:
    assert range_text({"min": 0, "max": 1, "max_exclusive": True}) == "[0, 1)"
    assert range_text({"min": 0, "max": 10**7, "min_exclusive": True}) == "(0, 10^7]"
    assert range_text({"min": -1e9, "max": 1e9}) == "[-10^9, 10^9]"
    assert range_text({}) == "—"
    assert not in_range({"min": 0, "max": 1, "max_exclusive": True}, 1)
    assert in_range({"min": 0, "max": 1, "max_exclusive": True}, 0)


def test_error_echoes_only_a_round_in_range() -> None:
    assert Error(code="bad_message", message="m", field=None, round=10**20).round is None
    assert Error(code="bad_message", message="m", field=None, round=-7).round is None
    assert Error(code="bad_message", message="m", field=None, round=3).round == 3


def raw_frame(msg_type: int, head: bytes, payload: bytes = b"", flags: int = 0) -> bytes:
    from shared.frame import FIXED_HEADER, MAGIC

    return FIXED_HEADER.pack(MAGIC, 1, msg_type, flags, len(head), len(payload)) + head + payload


@pytest.mark.parametrize("head", [
    b'{"round":0,"round":7}',  # duplicate key: the last would win in json.loads
    b'{"b":1,"a":2}',  # keys not sorted
    b'{"a": 1}',  # whitespace
    b' {"a":1}',
    b'{"a":1}\n',
    b'{"a":"\\u00e9"}',  # an escape canonical_json does not write
    b'{"a":1E2}',
    b'{"a":1.50}',
    b'{"a":-0}',
])
def test_non_canonical_headers_are_refused(head: bytes) -> None:
    with pytest.raises(FrameError) as err:
        decode_frame(raw_frame(Submit.TYPE, head))
    assert err.value.field == "header"
    assert err.value.code == "bad_frame"


def test_canonical_headers_round_trip() -> None:
    for header in ({"a": 1, "b": [1.5, None, True], "c": {"z": "é☃", "a": 1e-07}},
                   submit_header()):
        assert decode_frame(raw_frame(4, canonical_json(header))).header == header
    assert json.loads(canonical_json({"x": 2.0})) == {"x": 2.0}


def test_zstd_payload_must_be_exactly_one_frame() -> None:
    z = zstd()
    assert z is not None
    raw = b"\x00" + b"\x01\x02\x03\x04" * 600
    packed = z.compress(raw)
    header = submit_header(length=600, digest=sha256_hex(raw))
    ok = encode_frame(Submit.TYPE, header, packed, flags=FLAG_ZSTD)
    assert decode_message(ok).payload == raw  # type: ignore[attr-defined]
    for extra in (b"junk", packed, b"\x00"):  # trailing bytes, a second frame
        with pytest.raises(FrameError) as err:
            decode_message(encode_frame(Submit.TYPE, header, packed + extra, flags=FLAG_ZSTD))
        assert err.value.field == "payload"
    with pytest.raises(FrameError):  # truncated
        decode_message(encode_frame(Submit.TYPE, header, packed[:-3], flags=FLAG_ZSTD))
