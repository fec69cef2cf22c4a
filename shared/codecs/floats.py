"""Element-wise float codecs: raw32, fp16, bf16.

Payloads (n = length, all little-endian):

    raw32  u8 0 | f32[n]
    fp16   u8 1 | f16[n]   IEEE binary16, round-to-nearest-even (subnormals kept);
                           |x| >= 65520 (which would round to inf) saturates to +-65504
    bf16   u8 2 | u16[n]   upper 16 bits of the float32 after round-to-nearest-even on the
                           lower 16; a finite value that would round to inf saturates to
                           +-3.3895e38 (0x7F7F / 0xFF7F)

All three refuse NaN/inf inputs at encode (ValueError).
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

from shared.codecs.base import (
    CodecBase,
    Layout,
    Reader,
    check_finite_list,
    f32_array,
    le_array,
    le_bytes,
    refuse_non_finite,
)

F16_MAX = 65504.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Raw32(CodecBase):
    """Little-endian float32, no compression: the reference the others are measured against."""

    name: ClassVar[str] = "raw32"
    wire_id: ClassVar[int] = 0

    def max_encoded_size(self, length: int, *, layout: Layout = None) -> int:
        return 1 + 4 * length

    def _encode_pure(self, xs: list[float], layout: Layout) -> bytes:
        check_finite_list(xs, self.name)
        return le_bytes(f32_array(xs))

    def _encode_np(self, np: ModuleType, x: Any, layout: Layout) -> bytes:
        refuse_non_finite(bool(np.isfinite(x).all()), self.name)
        return bytes(x.astype("<f4", copy=False).tobytes())

    def _decode_pure(self, r: Reader, length: int, layout: Layout) -> array[float]:
        return le_array("f", r.expect_exactly(4 * length, "float32 values"))

    def _decode_np(self, np: ModuleType, r: Reader, length: int, layout: Layout) -> Any:
        body = r.expect_exactly(4 * length, "float32 values")
        return np.frombuffer(body, dtype="<f4").astype(np.float32)  # a copy, never a view


def f16_pack(xs: list[float]) -> bytes:
    """Python floats -> IEEE half (RNE), saturating at +-65504 (pure path)."""
    try:
        return struct.pack(f"<{len(xs)}e", *xs)
    except OverflowError:  # something rounds to inf: saturate, then pack
        return struct.pack(f"<{len(xs)}e", *(min(F16_MAX, max(-F16_MAX, x)) for x in xs))


def f16_pack_np(np: ModuleType, x: Any) -> bytes:
    """float32 array -> IEEE half bytes (RNE), saturating at +-65504 (numpy path)."""
    return bytes(np.clip(x, -F16_MAX, F16_MAX).astype("<f2").tobytes())


@dataclass(frozen=True, kw_only=True, slots=True)
class Fp16(CodecBase):
    """IEEE half precision; values beyond +-65504 saturate (gradients never get there)."""

    name: ClassVar[str] = "fp16"
    wire_id: ClassVar[int] = 1

    def max_encoded_size(self, length: int, *, layout: Layout = None) -> int:
        return 1 + 2 * length

    def _encode_pure(self, xs: list[float], layout: Layout) -> bytes:
        check_finite_list(xs, self.name)
        return f16_pack(xs)

    def _encode_np(self, np: ModuleType, x: Any, layout: Layout) -> bytes:
        refuse_non_finite(bool(np.isfinite(x).all()), self.name)
        return f16_pack_np(np, x)

    def _decode_pure(self, r: Reader, length: int, layout: Layout) -> array[float]:
        body = r.expect_exactly(2 * length, "float16 values")
        return f32_array(struct.unpack(f"<{length}e", body))

    def _decode_np(self, np: ModuleType, r: Reader, length: int, layout: Layout) -> Any:
        body = r.expect_exactly(2 * length, "float16 values")
        return np.frombuffer(body, dtype="<f2").astype(np.float32)


@dataclass(frozen=True, kw_only=True, slots=True)
class Bf16(CodecBase):
    """bfloat16: float32 with the low 16 mantissa bits rounded away (nearest-even)."""

    name: ClassVar[str] = "bf16"
    wire_id: ClassVar[int] = 2

    def max_encoded_size(self, length: int, *, layout: Layout = None) -> int:
        return 1 + 2 * length

    def _encode_pure(self, xs: list[float], layout: Layout) -> bytes:
        check_finite_list(xs, self.name)
        n = len(xs)
        out = []
        for u in struct.unpack(f"<{n}I", struct.pack(f"<{n}f", *xs)):
            h = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            out.append(h - 1 if h & 0x7FFF == 0x7F80 else h)  # would be inf: saturate
        return struct.pack(f"<{n}H", *out)

    def _encode_np(self, np: ModuleType, x: Any, layout: Layout) -> bytes:
        refuse_non_finite(bool(np.isfinite(x).all()), self.name)
        u = x.astype("<f4", copy=False).view("<u4")
        h = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
             >> np.uint32(16)).astype("<u2")
        h -= ((h & np.uint16(0x7FFF)) == np.uint16(0x7F80)).view(np.uint8).astype(np.uint16)
        return bytes(h.tobytes())

    def _decode_pure(self, r: Reader, length: int, layout: Layout) -> array[float]:
        halves = struct.unpack(f"<{length}H", r.expect_exactly(2 * length, "bfloat16 values"))
        return le_array("f", struct.pack(f"<{length}I", *(h << 16 for h in halves)))

    def _decode_np(self, np: ModuleType, r: Reader, length: int, layout: Layout) -> Any:
        halves = np.frombuffer(r.expect_exactly(2 * length, "bfloat16 values"), dtype="<u2")
        return (halves.astype("<u4") << np.uint32(16)).view("<f4")
