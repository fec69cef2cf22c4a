"""Update codecs: stateless, each with a wire id, one registry keyed by config name.

`encode(values) -> bytes`, `decode(data, length) -> Vector`. The caller owns any
error-feedback residual. The working core ships `raw32`; compressed codecs register here.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from shared.errors import BadUpdate
from shared.vec import Vector, all_finite, from_bytes, to_bytes


class Codec(Protocol):
    name: ClassVar[str]
    wire_id: ClassVar[int]
    estimated_ratio: ClassVar[float]  # encoded bytes / raw float32 bytes

    def encode(self, values: Vector) -> bytes: ...

    def decode(self, data: bytes, length: int) -> Vector: ...


class Raw32:
    """Little-endian float32, no compression. The reference every codec is measured against."""

    name: ClassVar[str] = "raw32"
    wire_id: ClassVar[int] = 0
    estimated_ratio: ClassVar[float] = 1.0

    def encode(self, values: Vector) -> bytes:
        return to_bytes(values)

    def decode(self, data: bytes, length: int) -> Vector:
        if len(data) != 4 * length:
            raise BadUpdate(f"raw32 payload is {len(data)} bytes, expected {4 * length} "
                            f"for {length} values", field="payload")
        return from_bytes(data)


CODECS: dict[str, Codec] = {c.name: c for c in (Raw32(),)}
BY_WIRE_ID: dict[int, Codec] = {c.wire_id: c for c in CODECS.values()}
assert len(BY_WIRE_ID) == len(CODECS), "two codecs share a wire id"


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known: {sorted(CODECS)}") from None


def decode_update(codec_name: str, data: bytes, length: int) -> Vector:
    """Decode an update and refuse non-finite values. Raises `BadUpdate`."""
    if codec_name not in CODECS:
        raise BadUpdate(f"unknown codec {codec_name!r}", field="codec")
    vec = CODECS[codec_name].decode(data, length)
    if len(vec) != length:
        raise BadUpdate(f"decoded {len(vec)} values, expected {length}", field="length")
    if not all_finite(vec):
        raise BadUpdate("update contains NaN or infinite values", field="payload")
    return vec


def make_codec(name: str, **params: object) -> Codec:
    """The codec `name` configured with `params` (raw32 takes none)."""
    codec = get_codec(name)
    if params:
        raise ValueError(f"codec {name!r} takes no parameters, got {sorted(params)}")
    return codec
