"""Update codecs: stateless, configured objects with a wire id, one registry keyed by name.

    codec = make_codec("int8-block", block=1024)      # or get_codec(name): default params
    payload = codec.encode(delta)                      # bytes; first byte = codec.wire_id
    vec = decode_update(payload, len(delta), expect="int8-block")   # checked decode

Every payload is self-describing (wire id + the parameters the decoder needs), so
`decode_payload` decodes any of them without configuration. The caller owns the
error-feedback residual (`with_error_feedback`). Byte layouts: each codec module's docstring.

| name       | wire id | module   | parameters (defaults)                                   |
|------------|---------|----------|---------------------------------------------------------|
| raw32      | 0       | floats   | -                                                       |
| fp16       | 1       | floats   | -                                                       |
| bf16       | 2       | floats   | -                                                       |
| int8-block | 3       | quant    | block=1024, mode="absmax"/"minmax", scale_dtype="fp32"  |
| int4-block | 4       | quant    | block=64, mode="absmax"/"minmax", scale_dtype="fp32"    |
| topk       | 5       | topk     | fraction=0.01, values="int8"/"fp16"/"int2", block=256 |
| powersgd   | 6       | powersgd | rank=4, seed=0 (needs layout)                           |
"""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Any

from shared.codecs.base import (
    Codec,
    CodecBase,
    Data,
    Layout,
    check_length,
    header_byte,
    with_error_feedback,
)
from shared.codecs.floats import Bf16, Fp16, Raw32
from shared.codecs.powersgd import PowerSGD
from shared.codecs.quant import Int4Block, Int8Block
from shared.codecs.topk import TopK
from shared.errors import BadUpdate
from shared.vec import Vector, all_finite

__all__ = [
    "BY_WIRE_ID",
    "CODECS",
    "Bf16",
    "Codec",
    "Fp16",
    "Int4Block",
    "Int8Block",
    "PowerSGD",
    "Raw32",
    "TopK",
    "codec_params",
    "decode_payload",
    "decode_update",
    "get_codec",
    "make_codec",
    "payload_codec",
    "with_error_feedback",
]

CODECS: dict[str, type[CodecBase]] = {
    c.name: c for c in (Raw32, Fp16, Bf16, Int8Block, Int4Block, TopK, PowerSGD)}
BY_WIRE_ID: dict[int, type[CodecBase]] = {c.wire_id: c for c in CODECS.values()}


def _check_registry() -> None:
    """Import-time: unique names and wire ids (u8), every codec able to decode."""
    if len(BY_WIRE_ID) != len(CODECS):
        raise AssertionError("two codecs share a wire id")
    for name, cls in CODECS.items():
        if cls.name != name or not 0 <= cls.wire_id <= 255:
            raise AssertionError(f"codec {name!r}: bad name or wire id")
        if not (callable(getattr(cls, "decode_payload", None))
                and callable(getattr(cls, "_read_params", None))):
            raise AssertionError(f"codec {name!r} has no decoder")


_check_registry()


def make_codec(name: str, **params: Any) -> Codec:
    """The codec `name` configured with `params`; ValueError names what is wrong."""
    cls = CODECS.get(name)
    if cls is None:
        raise ValueError(f"unknown codec {name!r}; known: {sorted(CODECS)}")
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"codec {name!r} has no parameter(s) {unknown}; it takes {known}")
    codec: Codec = cls(**params)  # __post_init__ raises ValueError naming the field
    return codec


@cache
def get_codec(name: str) -> Codec:
    """The codec `name` with its default parameters."""
    return make_codec(name)


def codec_params(codec: Codec) -> dict[str, Any]:
    """The parameters `codec` was made with: `make_codec(codec.name, **codec_params(codec))`."""
    # the codecs are dataclasses (make_codec reads their fields)
    assert dataclasses.is_dataclass(codec)
    assert not isinstance(codec, type)
    return dataclasses.asdict(codec)


def payload_codec(data: Data) -> type[CodecBase]:
    """The codec class a payload was encoded with (by its first byte); BadUpdate if none."""
    wid = header_byte(data)
    cls = BY_WIRE_ID.get(wid)
    if cls is None:
        raise BadUpdate(f"unknown codec wire id {wid}", field="codec")
    return cls


def decode_payload(data: Data, length: int, *, layout: Layout = None,
                   use_numpy: bool | None = None) -> Vector:
    """Decode ANY payload by its wire id. Raises only BadUpdate on bad input."""
    return payload_codec(data).decode_payload(data, length, layout=layout, use_numpy=use_numpy)


def decode_update(data: Data, length: int, *, expect: str | None = None, layout: Layout = None,
                  use_numpy: bool | None = None) -> Vector:
    """Decode an update and refuse non-finite values; `expect` pins the codec's name.

    BadUpdate field "codec": unknown wire id, or not the `expect`ed codec; "length": bad
    `length`; "layout": a layout that does not fit; "payload": anything else.
    """
    length = check_length(length)
    cls = payload_codec(data)
    if expect is not None and cls.name != expect:
        known = "" if expect in CODECS else " (not a known codec)"
        raise BadUpdate(f"payload is {cls.name!r}, expected {expect!r}{known}", field="codec")
    vec = cls.decode_payload(data, length, layout=layout, use_numpy=use_numpy)
    if len(vec) != length:  # pragma: no cover - every decoder checks this itself
        raise BadUpdate(f"decoded {len(vec)} values, expected {length}", field="length")
    if not all_finite(vec):
        raise BadUpdate("update contains NaN or infinite values", field="payload")
    return vec
