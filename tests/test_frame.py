"""Tests for shared.frame: the versioned binary frame, its limits and its typed errors."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz_frames import example_messages
from shared.errors import FrameError, FrameTooLarge, ProtocolError, UnsupportedVersion
from shared.frame import (
    FIXED_HEADER,
    FIXED_LEN,
    MAGIC,
    MAX_HEADER_LEN,
    PROTOCOL_VERSION,
    canonical_json,
    decode_frame,
    encode_frame,
    peek_lengths,
)
from shared.messages import (
    MESSAGE_TYPES,
    Ack,
    Error,
    Hello,
    Message,
    RoundCommitted,
    RoundOpen,
    Submit,
    Welcome,
    decode_message,
    sha256_hex,
)

NODE = "0123456789abcdef" * 4
PARAMS = struct.pack("<3f", 1.0, -2.5, 0.125)
UPDATE = struct.pack("<2f", 0.5, -0.25)


def raw_frame(head: bytes, payload: bytes = b"", *, magic: bytes = MAGIC,
              version: int = PROTOCOL_VERSION, msg_type: int = 1, flags: int = 0,
              head_len: int | None = None, pay_len: int | None = None) -> bytes:
    """A frame built by hand, so every field can be made wrong on purpose."""
    fixed = FIXED_HEADER.pack(magic, version, msg_type, flags,
                              len(head) if head_len is None else head_len,
                              len(payload) if pay_len is None else pay_len)
    return fixed + head + payload


def sample_messages() -> list[Message]:
    return [
        Hello(node_id=NODE, public_key="ab" * 16, challenge="cd" * 32, nonce="ef" * 16,
              runtime="native", agent="test/1", device="cpu"),
        Welcome(run_id="run-1", node_id=NODE, model={"kind": "mlp", "width": 8},
                model_id="ab" * 32, data={"name": "markov", "seed": 3}, shard=1, n_shards=2,
                codec="raw32", codec_params={}, error_feedback=False, n_params=3),
        RoundOpen(run_id="run-1", round=2, attempt=0, params_digest=sha256_hex(PARAMS),
                  deadline_s=30.5, inner_steps=4, inner_lr=0.001, batch_size=8, payload=PARAMS),
        Submit(run_id="run-1", round=2, node_id=NODE, nonce="01" * 16, codec="raw32", length=2,
               digest=sha256_hex(UPDATE), train_loss=1.25, samples=32, compute_s=0.5,
               payload=UPDATE),
        Ack(round=2, digest=sha256_hex(UPDATE), status="accepted"),
        Error(code="bad_update", message="nope", field="digest", round=2),
        RoundCommitted(round=2, eval_loss=1.5, n_updates=3, params_digest=sha256_hex(PARAMS),
                       final=False),
    ]


# built once (messages draw a random nonce); plus one message of every registered type,
# built from the registry, so the property tests below cover a new type without edits
SAMPLES = sample_messages() + list(example_messages().values())
VALID_FRAMES = [m.to_frame() for m in SAMPLES]


# -- round trip ----------------------------------------------------------------------------
def test_round_trip_header_and_payload() -> None:
    header = {"b": [1, 2, {"x": None}], "a": "héllo", "c": 1.5, "d": True}
    payload = bytes(range(256))
    data = encode_frame(7, header, payload)
    assert data[:4] == MAGIC
    assert len(data) == FIXED_LEN + len(canonical_json(header)) + len(payload)
    frame = decode_frame(data)
    assert frame.version == PROTOCOL_VERSION
    assert frame.msg_type == 7
    assert frame.flags == 0
    assert frame.header == header
    assert frame.payload == payload
    # the same frame decodes from any bytes-like type
    assert decode_frame(bytearray(data)) == frame
    assert decode_frame(memoryview(data)) == frame


def test_round_trip_empty_header_and_payload() -> None:
    data = encode_frame(0, {})
    assert len(data) == FIXED_LEN + 2
    frame = decode_frame(data)
    assert frame.header == {}
    assert frame.payload == b""


def test_fixed_header_layout_is_little_endian() -> None:
    data = encode_frame(5, {"k": 1}, b"\x01\x02\x03")
    assert data[0:4] == b"DAAP"
    assert data[4] == PROTOCOL_VERSION
    assert data[5] == 5
    assert data[6:8] == b"\x00\x00"
    assert data[8:12] == struct.pack("<I", len(b'{"k":1}'))
    assert data[12:16] == struct.pack("<I", 3)
    assert data[16:] == b'{"k":1}\x01\x02\x03'


def test_header_is_canonical_json() -> None:
    data = encode_frame(1, {"z": 1, "a": {"y": 2, "b": 3}, "m": "é"})
    head = data[FIXED_LEN:]
    assert head == '{"a":{"b":3,"y":2},"m":"é","z":1}'.encode()


def test_peek_lengths() -> None:
    data = encode_frame(1, {"a": 1}, b"xyz")
    assert peek_lengths(data) == (len(b'{"a":1}'), 3)
    # works on the fixed header alone, without the rest of the frame
    assert peek_lengths(data[:FIXED_LEN]) == (len(b'{"a":1}'), 3)
    with pytest.raises(FrameError, match="truncated"):
        peek_lengths(data[:FIXED_LEN - 1])


# -- encoder refusals ------------------------------------------------------------------------
@pytest.mark.parametrize("msg_type", [-1, 256])
def test_encode_refuses_out_of_range_type(msg_type: int) -> None:
    with pytest.raises(FrameError) as info:
        encode_frame(msg_type, {})
    assert info.value.field == "msg_type"
    assert str(msg_type) in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_encode_refuses_non_finite_header(bad: float) -> None:
    with pytest.raises(FrameError) as info:
        encode_frame(1, {"x": bad})
    assert type(info.value) is FrameError
    assert info.value.field == "header"


def test_encode_refuses_header_too_large() -> None:
    with pytest.raises(FrameTooLarge) as info:
        encode_frame(1, {"x": "a" * MAX_HEADER_LEN})
    assert info.value.code == "frame_too_large"
    assert str(MAX_HEADER_LEN) in str(info.value)


def test_encode_accepts_header_at_limit() -> None:
    pad = MAX_HEADER_LEN - len(b'{"x":""}')
    data = encode_frame(1, {"x": "a" * pad})
    assert peek_lengths(data)[0] == MAX_HEADER_LEN
    assert decode_frame(data).header["x"] == "a" * pad


# -- decoder refusals ------------------------------------------------------------------------
def test_bad_magic() -> None:
    data = raw_frame(b"{}", magic=b"XXXX")
    with pytest.raises(FrameError) as info:
        decode_frame(data)
    assert type(info.value) is FrameError
    assert info.value.code == "bad_frame"
    assert info.value.field == "magic"
    assert "magic" in str(info.value)
    assert "XXXX" in str(info.value)


def test_not_bytes() -> None:
    with pytest.raises(FrameError, match="str"):
        decode_frame("DAAP" * 8)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, 1, 4, FIXED_LEN - 1])
def test_truncated_below_fixed_header(n: int) -> None:
    data = encode_frame(1, {"a": 1}, b"pp")
    with pytest.raises(FrameError) as info:
        decode_frame(data[:n])
    assert type(info.value) is FrameError
    assert "truncated" in str(info.value)
    assert str(n) in str(info.value)


def test_truncated_inside_header() -> None:
    data = encode_frame(1, {"abc": 12345}, b"")
    with pytest.raises(FrameError) as info:
        decode_frame(data[:FIXED_LEN + 3])
    assert type(info.value) is FrameError
    assert info.value.field == "length"


def test_truncated_inside_payload() -> None:
    data = encode_frame(1, {"a": 1}, b"0123456789")
    with pytest.raises(FrameError) as info:
        decode_frame(data[:-1])
    assert type(info.value) is FrameError
    assert info.value.field == "length"
    assert str(len(data) - 1) in str(info.value)


def test_trailing_bytes() -> None:
    data = encode_frame(1, {"a": 1}, b"pay")
    with pytest.raises(FrameError) as info:
        decode_frame(data + b"\x00")
    assert type(info.value) is FrameError
    assert info.value.field == "length"


def test_payload_above_limit_refused_from_fixed_header_alone() -> None:
    # 16 bytes declaring a 1 GiB payload: refused without the bytes being present.
    data = raw_frame(b"", head_len=2, pay_len=1 << 30)
    assert len(data) == FIXED_LEN
    with pytest.raises(FrameTooLarge) as info:
        decode_frame(data)
    assert info.value.code == "frame_too_large"
    assert info.value.field == "payload_len"
    assert str(1 << 30) in str(info.value)


def test_payload_limit_is_the_receivers() -> None:
    data = encode_frame(1, {}, b"12345678")
    assert decode_frame(data, max_payload=8).payload == b"12345678"
    with pytest.raises(FrameTooLarge, match="limit 7"):
        decode_frame(data, max_payload=7)


def test_header_above_limit_refused_from_fixed_header_alone() -> None:
    data = raw_frame(b"", head_len=MAX_HEADER_LEN + 1, pay_len=0)
    with pytest.raises(FrameTooLarge) as info:
        decode_frame(data)
    assert info.value.field == "header_len"
    assert str(MAX_HEADER_LEN) in str(info.value)


def test_max_uint32_lengths_refused() -> None:
    data = raw_frame(b"", head_len=0xFFFFFFFF, pay_len=0xFFFFFFFF)
    with pytest.raises(FrameTooLarge):
        decode_frame(data)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version_names_both(version: int) -> None:
    data = raw_frame(b"{}", version=version)
    with pytest.raises(UnsupportedVersion) as info:
        decode_frame(data)
    assert info.value.code == "unsupported_version"
    assert info.value.field == "version"
    msg = str(info.value)
    assert f"version {version}" in msg
    assert f"version {PROTOCOL_VERSION}" in msg


def test_version_checked_before_lengths() -> None:
    # a peer speaking another version is told so, even if its lengths mean nothing to us
    data = raw_frame(b"", version=9, head_len=1 << 31, pay_len=1 << 31)
    with pytest.raises(UnsupportedVersion):
        decode_frame(data)


@pytest.mark.parametrize("flags", [4, 0x8000, 0xFFFF])
def test_unknown_flags(flags: int) -> None:
    data = raw_frame(b"{}", flags=flags)
    with pytest.raises(FrameError) as info:
        decode_frame(data)
    assert type(info.value) is FrameError
    assert info.value.field == "flags"
    assert f"{flags:#06x}" in str(info.value)


@pytest.mark.parametrize("head", [b"\xff\xfe{}", b'{"a":"\xc3"}', b"\xed\xa0\x80"])
def test_non_utf8_header(head: bytes) -> None:
    with pytest.raises(FrameError) as info:
        decode_frame(raw_frame(head))
    assert type(info.value) is FrameError
    assert info.value.field == "header"
    assert "UTF-8" in str(info.value)


@pytest.mark.parametrize("head", [b"", b"{", b"{'a':1}", b'{"a":1,}', b"{} {}"])
def test_header_not_json(head: bytes) -> None:
    with pytest.raises(FrameError) as info:
        decode_frame(raw_frame(head))
    assert type(info.value) is FrameError
    assert info.value.field == "header"


@pytest.mark.parametrize("head", [b"[]", b"[1,2]", b"1", b'"s"', b"null", b"true"])
def test_header_not_an_object(head: bytes) -> None:
    with pytest.raises(FrameError) as info:
        decode_frame(raw_frame(head))
    assert type(info.value) is FrameError
    assert info.value.field == "header"
    assert "object" in str(info.value)


@pytest.mark.parametrize("const", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_constant_in_header(const: str) -> None:
    head = f'{{"x":{const}}}'.encode()
    with pytest.raises(FrameError) as info:
        decode_frame(raw_frame(head))
    assert type(info.value) is FrameError
    assert info.value.field == "header"
    assert const.lstrip("-") in str(info.value)


@pytest.mark.parametrize("open_close", [("[", "]"), ('{"a":', "}")])
def test_deeply_nested_header(open_close: tuple[str, str]) -> None:
    depth = 5_000  # far past the interpreter recursion limit, within MAX_HEADER_LEN
    opener, closer = open_close
    head = (opener * depth + "1" + closer * depth).encode()
    if opener == "[":
        head = b'{"a":' + head + b"}"
    assert len(head) <= MAX_HEADER_LEN
    with pytest.raises(FrameError) as info:
        decode_frame(raw_frame(head))
    assert type(info.value) is FrameError
    assert info.value.field == "header"


def test_huge_integer_in_header_is_a_frame_error() -> None:
    head = b'{"a":' + b"9" * 5000 + b"}"
    with pytest.raises(FrameError):
        decode_frame(raw_frame(head))


def test_checks_run_in_documented_order() -> None:
    # magic first, then version, then flags, then lengths
    both = raw_frame(b"{}", magic=b"NOPE", version=7, flags=1)
    with pytest.raises(FrameError) as info:
        decode_frame(both)
    assert info.value.field == "magic"
    ver_flags = raw_frame(b"{}", version=7, flags=1)
    with pytest.raises(UnsupportedVersion):
        decode_frame(ver_flags)


def test_errors_are_protocol_errors_with_codes() -> None:
    assert issubclass(FrameTooLarge, FrameError)
    assert issubclass(UnsupportedVersion, FrameError)
    assert issubclass(FrameError, ProtocolError)
    assert {FrameError.code, FrameTooLarge.code, UnsupportedVersion.code} == {
        "bad_frame", "frame_too_large", "unsupported_version"}


# -- property tests --------------------------------------------------------------------------
def _decode_only_protocol_errors(data: bytes) -> None:
    try:
        msg = decode_message(data)
    except ProtocolError:
        return
    # whatever decodes is a valid message that re-encodes and decodes back to itself
    assert isinstance(msg, Message)
    assert decode_message(msg.to_frame()) == msg


PROPS = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(st.binary(max_size=256))
def test_random_bytes_only_raise_protocol_errors(data: bytes) -> None:
    _decode_only_protocol_errors(data)


@PROPS
@given(st.binary(max_size=200))
def test_random_bytes_after_valid_fixed_header(tail: bytes) -> None:
    # a correct magic/version/lengths with random header and payload bytes
    for msg_type in (0, *sorted(MESSAGE_TYPES), max(MESSAGE_TYPES) + 1, 255):
        data = FIXED_HEADER.pack(MAGIC, PROTOCOL_VERSION, msg_type, 0, len(tail), 0) + tail
        _decode_only_protocol_errors(data)


@st.composite
def mutated_frame(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID_FRAMES)))
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "overwrite", "mixed"]))
    if kind in ("flip", "mixed"):
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    if kind in ("truncate", "mixed"):
        data = data[:draw(st.integers(0, len(data) - 1))]
    if kind in ("extend", "mixed"):
        data += draw(st.binary(min_size=1, max_size=32))
    if kind == "overwrite":
        i = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        data[i:i + len(chunk)] = chunk
    return bytes(data)


@PROPS
@given(mutated_frame())
def test_mutated_frames_only_raise_protocol_errors(data: bytes) -> None:
    _decode_only_protocol_errors(data)


@st.composite
def mutated_header(draw: st.DrawFn) -> bytes:
    """A valid frame whose JSON header has one field replaced by a random JSON value."""
    msg = draw(st.sampled_from(SAMPLES))
    frame = decode_frame(msg.to_frame())
    header = dict(frame.header)
    # (out-of-range numbers get a deterministic test of their own in test_messages.py)
    edge_values = st.sampled_from([0, -1, 2**31, 2**63, 2**64, 1e308, -0.0, "", "\n",
                                   "0" * 64, [], {}])
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | edge_values
        | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=70),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                    inner, max_size=3),
        max_leaves=6)
    key = draw(st.sampled_from([*sorted(header), "extra"]))
    if draw(st.booleans()) and key in header:
        del header[key]
    else:
        header[key] = draw(json_values)
    return raw_frame(canonical_json(header), frame.payload, msg_type=frame.msg_type)


@PROPS
@given(mutated_header())
def test_mutated_headers_only_raise_protocol_errors(data: bytes) -> None:
    _decode_only_protocol_errors(data)


def test_samples_cover_every_message_type() -> None:
    assert {m.TYPE for m in SAMPLES} == set(MESSAGE_TYPES)
    assert {data[5] for data in VALID_FRAMES} == set(MESSAGE_TYPES)


def test_valid_frames_decode() -> None:
    for data, msg in zip(VALID_FRAMES, SAMPLES, strict=True):
        assert decode_message(data) == msg
        assert decode_message(data).to_frame() == data
