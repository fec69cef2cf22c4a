"""What every codec shares: the `Codec` protocol, a bounds-checked payload reader, the choice
between the pure-Python reference and the numpy fast path, and error feedback.

Payload = header + body. The header is the codec's `wire_id` (u8) followed by the parameters
the decoder needs (fixed width, little-endian); see each codec's module for its layout.

Two paths, one result. Every codec (except PowerSGD's encoder, which needs numpy) has a
pure-Python reference (stdlib only, runs in Pyodide) and a numpy fast path that produce
BYTE-IDENTICAL payloads and decodes. `use_numpy=None` (the default) takes numpy when it is
available and the input is not an `array.array`; `True` / `False` force a path.

Decoders raise only `BadUpdate` on malformed input, and check every declared count against
`length` and the bytes that remain BEFORE allocating anything. A payload that carries
non-finite values (no encoder writes one) decodes to non-finite values, NaN payload bits
unspecified; `decode_update` refuses such updates.

Error feedback: codecs are stateless; the caller owns the residual:

    x = delta + residual
    payload = codec.encode(x)
    residual = x - codec.decode(payload, len(x))

`with_error_feedback(codec, delta, residual)` is that, as a pure function.
"""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from shared.errors import BadUpdate
from shared.vec import Vector, numpy_module

if TYPE_CHECKING:
    from shared.layout import TensorSlot

Layout = Sequence["TensorSlot"] | None
Data = bytes | bytearray | memoryview
CHUNK = 1 << 16  # values per numpy chunk: float64 temporaries stay in L2


class Codec(Protocol):
    name: ClassVar[str]  # registry / config name
    wire_id: ClassVar[int]  # first byte of every payload

    @property
    def estimated_ratio(self) -> float: ...  # encoded bytes / raw float32 bytes, large n

    def encode(self, values: Vector, *, layout: Layout = None,
               use_numpy: bool | None = None) -> bytes: ...

    def decode(self, data: Data, length: int, *, layout: Layout = None,
               use_numpy: bool | None = None) -> Vector: ...

    def max_encoded_size(self, length: int, *, layout: Layout = None) -> int: ...


def bad(message: str, field: str = "payload") -> BadUpdate:
    return BadUpdate(message, field=field)


class Reader:
    """Sequential little-endian reads over a payload; running past the end is `BadUpdate`."""

    __slots__ = ("mv", "name", "pos")

    def __init__(self, data: Data, name: str) -> None:
        self.mv = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        self.pos = 0
        self.name = name

    @property
    def remaining(self) -> int:
        return len(self.mv) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining:
            raise bad(f"{self.name} payload truncated: {what} needs {n} bytes, "
                      f"{self.remaining} left")
        out = self.mv[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def expect_exactly(self, n: int, what: str) -> memoryview:
        """The rest of the payload, which must be exactly `n` bytes."""
        if n != self.remaining:
            raise bad(f"{self.name} payload has {self.remaining} bytes of {what}, expected {n}")
        return self.take(n, what)


def check_length(length: int) -> int:
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise BadUpdate(f"length must be a non-negative int, got {length!r}", field="length")
    return length


def header_byte(data: Data) -> int:
    if len(data) == 0:
        raise bad("empty payload")
    return int(memoryview(data).cast("B")[0]) if not isinstance(data, bytes) else data[0]


# -- path choice and conversions --------------------------------------------------------------
def pick_numpy(values: object, use_numpy: bool | None) -> ModuleType | None:
    """numpy for the fast path, or None for the pure-Python reference."""
    np = numpy_module()
    if use_numpy is None:
        return None if isinstance(values, array) else np
    if use_numpy and np is None:
        raise ValueError("use_numpy=True but numpy is not available here")
    return np if use_numpy else None


def as_f32_numpy(np: ModuleType, values: Vector) -> Any:
    x = np.asarray(values, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"values must be a flat vector, got shape {x.shape}")
    return x


def as_f32_list(values: Vector) -> list[float]:
    """The input rounded to float32 (as Python floats, exact), for the pure path."""
    np = numpy_module()
    if np is not None and isinstance(values, np.ndarray) and values.ndim != 1:
        raise ValueError(f"values must be a flat vector, got shape {values.shape}")
    if isinstance(values, array) and values.typecode == "f":
        return values.tolist()
    return array("f", values).tolist()


def refuse_non_finite(ok: bool, codec: str) -> None:
    if not ok:
        raise ValueError(f"{codec}: values contain NaN or infinity; refusing to encode")


def check_finite_list(xs: list[float], codec: str) -> None:
    refuse_non_finite(all(map(math.isfinite, xs)), codec)


def f32_array(values: Sequence[float]) -> array[float]:
    """Python floats -> array('f'), each rounded to nearest-even float32 (inf on overflow)."""
    return array("f", values)


def f32_round(x: float) -> float:
    """One float64 rounded to nearest-even float32 (inf on overflow), as a Python float."""
    return array("f", (x,))[0]


def f16_round(x: float) -> float:
    """One float64 rounded to nearest-even float16; |x| beyond 65504 saturates to +-65504."""
    x = min(65504.0, max(-65504.0, x))
    return float(struct.unpack("<e", struct.pack("<e", x))[0])


def le_bytes(a: array[Any]) -> bytes:
    """array -> little-endian bytes."""
    if sys.byteorder == "big":  # pragma: no cover
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


def le_array(typecode: str, data: Data) -> array[Any]:
    """Little-endian bytes -> array of `typecode`."""
    out = array(typecode)
    out.frombytes(bytes(data))
    if sys.byteorder == "big":  # pragma: no cover
        out.byteswap()
    return out


def out_vector(np: ModuleType | None, f32: Any) -> Vector:
    """The decoder's result: numpy float32 array when `np`, else array('f')."""
    if np is None:
        return f32 if isinstance(f32, array) else f32_array(f32)
    out = np.ascontiguousarray(f32, dtype=np.float32)
    return out if out.flags.writeable else out.copy()


# -- error feedback ---------------------------------------------------------------------------
def with_error_feedback(codec: Codec, delta: Vector, residual: Vector | None, *,
                        layout: Layout = None, consume: bool = False) -> tuple[bytes, Vector]:
    """Encode `delta + residual`; return (payload, new residual = what the codec lost).

    Pure: nothing is mutated, unless `consume`: then the caller gives `residual` up, and a
    writable float32 numpy residual becomes the new one in place (x = residual + delta is
    written into it: one model-sized vector fewer, 0.5 GB at 125M). `residual=None` means
    zeros (the first round). The vector kind follows `delta` (numpy in, numpy out;
    array('f') in, array('f') out), in float32. A codec with `decode_sparse` (topk) takes
    back only what it kept (x[idx] -= values: the same bits as x - decode(payload)).
    """
    np = numpy_module()
    if np is not None and not isinstance(delta, array):
        x = d = np.asarray(delta, dtype=np.float32)
        if residual is not None:
            if consume and isinstance(residual, np.ndarray) and residual.dtype == np.float32 \
                    and residual.flags.writeable and residual.shape == d.shape:
                x = np.add(residual, d, out=residual)
            else:
                x = d + np.asarray(residual, dtype=np.float32)  # ours: the new residual
        payload = codec.encode(x, layout=layout)
        sparse = getattr(codec, "decode_sparse", None)
        if sparse is not None:  # what the codec kept: indices + values, no n-sized decode
            idx, vals = sparse(payload, x.size)
            lost = x.copy() if x is d else x  # never write the caller's delta
            lost[idx] -= vals
            return payload, lost
        back = np.asarray(codec.decode(payload, x.size, layout=layout), dtype=np.float32)
        if residual is None:
            return payload, x - back
        np.subtract(x, back, out=x)  # one vector fewer at the peak (a 125M node: 0.5 GB)
        return payload, x
    xs = f32_array(delta)
    if residual is not None:
        if len(residual) != len(xs):
            raise ValueError(f"residual has {len(residual)} values, delta {len(xs)}")
        xs = f32_array([a + b for a, b in zip(xs, residual, strict=True)])
    payload = codec.encode(xs, layout=layout)
    back = codec.decode(payload, len(xs), layout=layout, use_numpy=False)
    return payload, f32_array([a - b for a, b in zip(xs, back, strict=True)])


# -- the shared encode/decode skeleton --------------------------------------------------------
class CodecBase:
    """Header handling and path dispatch; subclasses are frozen dataclasses that implement
    `_params` / `_read_params` (header) and `_encode_*` / `_decode_*` (body)."""

    __slots__ = ()
    name: ClassVar[str]
    wire_id: ClassVar[int]
    needs_layout: ClassVar[bool] = False

    # -- to implement ------------------------------------------------------------------------
    def _params(self) -> bytes:
        """The header after the wire id: the parameters the decoder needs."""
        return b""

    @classmethod
    def _read_params(cls, r: Reader) -> Any:
        """Parse `_params` back (raises BadUpdate) into the body decoder: an object with
        `_decode_pure` / `_decode_np`, normally a codec instance."""
        return cls()

    def _encode_pure(self, xs: list[float], layout: Layout) -> bytes:
        raise NotImplementedError

    def _encode_np(self, np: ModuleType, x: Any, layout: Layout) -> bytes:
        raise NotImplementedError

    def _decode_pure(self, r: Reader, length: int, layout: Layout) -> array[float]:
        raise NotImplementedError

    def _decode_np(self, np: ModuleType, r: Reader, length: int, layout: Layout) -> Any:
        raise NotImplementedError

    def max_encoded_size(self, length: int, *, layout: Layout = None) -> int:
        raise NotImplementedError

    # -- public ------------------------------------------------------------------------------
    @property
    def estimated_ratio(self) -> float:
        """Encoded bytes / raw float32 bytes for a large vector (headers neglected)."""
        n = 1 << 20
        return self.max_encoded_size(n) / (4 * n)

    def encode(self, values: Vector, *, layout: Layout = None,
               use_numpy: bool | None = None) -> bytes:
        """Encode a flat float32 vector (NaN/inf refused with ValueError)."""
        np = pick_numpy(values, use_numpy)
        if np is None:
            body = self._encode_pure(as_f32_list(values), layout)
        else:
            body = self._encode_np(np, as_f32_numpy(np, values), layout)
        return b"".join((bytes((self.wire_id,)), self._params(), body))

    def decode(self, data: Data, length: int, *, layout: Layout = None,
               use_numpy: bool | None = None) -> Vector:
        """Decode a payload of THIS codec (its own header decides the parameters)."""
        return type(self).decode_payload(data, length, layout=layout, use_numpy=use_numpy)

    @classmethod
    def open_payload(cls, data: Data, length: int) -> tuple[int, Reader, Any]:
        """(checked length, a reader past the header, the codec the header describes) of a
        payload of THIS codec; BadUpdate on a wrong wire id or header."""
        length = check_length(length)
        wid = header_byte(data)
        if wid != cls.wire_id:
            raise bad(f"payload has wire id {wid}, not {cls.name}'s {cls.wire_id}", "codec")
        r = Reader(data, cls.name)
        r.take(1, "wire id")
        return length, r, cls._read_params(r)

    @classmethod
    def decode_payload(cls, data: Data, length: int, *, layout: Layout = None,
                       use_numpy: bool | None = None) -> Vector:
        length, r, codec = cls.open_payload(data, length)
        if use_numpy and numpy_module() is None:
            raise ValueError("use_numpy=True but numpy is not available here")
        np = numpy_module() if use_numpy is not False else None
        if np is None:
            return out_vector(None, codec._decode_pure(r, length, layout))
        with np.errstate(all="ignore"):  # non-finite payload values: decode_update refuses
            return out_vector(np, codec._decode_np(np, r, length, layout))


def build(cls: type[Any], **params: Any) -> Any:
    """`cls(**params)` for a decoder: invalid parameters in a header are `BadUpdate`."""
    try:
        return cls(**params)
    except (ValueError, TypeError) as exc:
        raise bad(f"{cls.name} header: {exc}") from None
