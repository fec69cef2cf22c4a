"""Flat float32 vectors: the one place that picks the numpy fast path or pure Python.

A `Vector` is a numpy float32 array where numpy exists (native), else an `array.array("f")`
(Pyodide, which ships no numpy). Every pure function in `shared/` accepts both and returns
the kind it was given. The wire form is always little-endian float32 bytes.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Sequence
from functools import cache
from types import ModuleType
from typing import Any

IN_BROWSER = "_pyodide_core" in sys.modules
Vector = Any  # numpy.ndarray[float32] | array.array[float]


@cache
def numpy_module() -> ModuleType | None:
    """numpy when it can be used (never in the browser), else None. Decided once."""
    if IN_BROWSER:
        return None
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is a native dependency
        return None
    return numpy


def is_numpy(v: object) -> bool:
    np = numpy_module()
    return np is not None and isinstance(v, np.ndarray)


def read_bytes(data: bytes | bytearray | memoryview) -> Vector:
    """Little-endian float32 bytes -> a READ-ONLY Vector over them where numpy can (no copy:
    a 125M-value update is 0.5 GB), else a copy. For values that are only read; the caller
    keeps `data` unchanged while the vector is in use."""
    np = numpy_module()
    if np is None or sys.byteorder == "big" or len(data) % 4:
        return from_bytes(data)
    v = np.frombuffer(data, dtype=np.float32)
    v.flags.writeable = False
    return v


def from_bytes(data: bytes | bytearray | memoryview, *, use_numpy: bool | None = None) -> Vector:
    """Little-endian float32 bytes -> Vector (a copy)."""
    if len(data) % 4:
        raise ValueError(f"{len(data)} bytes is not a whole number of float32 values")
    np = numpy_module() if use_numpy is not False else None
    if np is not None:
        return np.frombuffer(data, dtype="<f4").astype(np.float32)  # one copy, not two
    out = array("f")
    out.frombytes(bytes(data))
    if sys.byteorder == "big":  # pragma: no cover
        out.byteswap()
    return out


def to_bytes(v: Vector) -> bytes:
    """Vector -> little-endian float32 bytes."""
    if is_numpy(v):
        return bytes(v.astype("<f4", copy=False).tobytes())
    out = array("f", v)
    if sys.byteorder == "big":  # pragma: no cover
        out.byteswap()
    return out.tobytes()


def byte_view(v: Vector) -> bytes | memoryview:
    """Vector -> its little-endian float32 bytes to READ (hash, send): a read-only view of a
    contiguous float32 vector where the machine is little-endian (no copy: 0.5 GB at 125M
    values), else `to_bytes`'s copy. Valid while `v` is neither resized nor written."""
    np = numpy_module()
    if sys.byteorder == "little" and (
            (np is not None and isinstance(v, np.ndarray) and v.dtype == np.float32
             and v.flags.c_contiguous)
            or (isinstance(v, array) and v.typecode == "f")):
        return memoryview(v).cast("B").toreadonly()
    return to_bytes(v)


def zeros_like(v: Vector) -> Vector:
    if is_numpy(v):
        np = numpy_module()
        assert np is not None
        return np.zeros_like(v, dtype=np.float32)
    return array("f", bytes(4 * len(v)))


def all_finite(v: Vector) -> bool:
    """True when no value is NaN or +-inf."""
    if is_numpy(v):
        np = numpy_module()
        assert np is not None
        return bool(np.isfinite(v).all())
    return all(math.isfinite(x) for x in v)


def l2_norm(v: Vector) -> float:
    if is_numpy(v):
        np = numpy_module()
        assert np is not None
        return float(np.linalg.norm(v.astype(np.float64)))
    return math.sqrt(math.fsum(x * x for x in v))


def same_kind(template: Vector, values: Sequence[float]) -> Vector:
    """Wrap plain float values in the kind of vector `template` is."""
    if is_numpy(template):
        np = numpy_module()
        assert np is not None
        return np.asarray(values, dtype=np.float32)
    return array("f", values)


def add(a: Vector, b: Vector) -> Vector:
    """a + b in float32 (the kind of `a`)."""
    if is_numpy(a):
        np = numpy_module()
        assert np is not None
        return (a + np.asarray(b, dtype=np.float32)).astype(np.float32)
    if len(a) != len(b):
        raise ValueError(f"vectors of {len(a)} and {len(b)} values")
    return array("f", [x + y for x, y in zip(a, b, strict=True)])


def sub(a: Vector, b: Vector) -> Vector:
    """a - b in float32 (the kind of `a`)."""
    if is_numpy(a):
        np = numpy_module()
        assert np is not None
        return (a - np.asarray(b, dtype=np.float32)).astype(np.float32)
    if len(a) != len(b):
        raise ValueError(f"vectors of {len(a)} and {len(b)} values")
    return array("f", [x - y for x, y in zip(a, b, strict=True)])


def any_nonzero(v: Vector) -> bool:
    if is_numpy(v):
        np = numpy_module()
        assert np is not None
        return bool(np.any(v))
    return any(v)
