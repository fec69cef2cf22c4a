"""Property tests for the codecs (hypothesis).

1. The pure-Python reference and the numpy fast path produce BYTE-IDENTICAL payloads and
   decodes, on random and adversarial float32 vectors (length 1, lengths off the block
   size, zeros, -0.0, constant blocks, huge / tiny / subnormal magnitudes, fp16 and bf16
   rounding ties, top-k magnitude ties).
2. Decoders, fed random bytes, bit flips, truncations, extensions and wrong lengths, either
   raise BadUpdate or return `length` values, and both paths agree on which (and on the
   values).
"""

from __future__ import annotations

import struct
from array import array
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.codecs import decode_payload, make_codec
from shared.codecs.powersgd import layout_of
from shared.errors import BadUpdate

CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("raw32", {}),
    ("fp16", {}),
    ("bf16", {}),
    ("int8-block", {"block": 16}),
    ("int8-block", {"block": 5, "mode": "minmax"}),
    ("int8-block", {"block": 7, "scale_dtype": "fp16"}),
    ("int8-block", {"block": 64, "mode": "minmax", "scale_dtype": "fp16"}),
    ("int8-block", {}),
    ("int4-block", {"block": 3}),
    ("int4-block", {"block": 8, "mode": "minmax", "scale_dtype": "fp32"}),
    ("int4-block", {"block": 16, "mode": "minmax", "scale_dtype": "fp16"}),
    ("topk", {"fraction": 0.1, "block": 3}),
    ("topk", {"fraction": 0.3, "values": "fp16"}),
    ("topk", {"fraction": 0.01}),
    ("topk", {"fraction": 1.0, "block": 1}),
]
PROP = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def f32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


EDGES = [f32(v) for v in (
    0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, -1e-45, 1.17549435e-38, 2.0 ** -24, 2.0 ** -25,
    3 * 2.0 ** -25, 6.1035156e-05, 65504.0, 65519.99, 65520.0, -65536.0, 1e6,
    3.4028234663852886e38, -3.4028234663852886e38, 3.3961e38, 1.0 + 2 ** -11,
    1.0 + 3 * 2 ** -11, 2049.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 127.5, 0.1, -2.5)]
element = st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False),
                    st.sampled_from(EDGES),
                    st.floats(min_value=f32(-1e-3), max_value=f32(1e-3), width=32))


@st.composite
def vectors(draw: st.DrawFn) -> list[float]:
    n = draw(st.integers(1, 300))
    kind = draw(st.sampled_from(["any", "gauss", "const", "ties", "blocks"]))
    if kind == "any":
        return draw(st.lists(element, min_size=n, max_size=n))
    if kind == "gauss":
        seed = draw(st.integers(0, 2 ** 32 - 1))
        scale = draw(st.sampled_from([1e-30, 1e-6, 1e-3, 1.0, 1e4, 1e30]))
        rng = np.random.default_rng(seed)
        gauss: list[float] = (rng.standard_t(3, n) * scale).astype(np.float32).tolist()
        return gauss
    if kind == "const":
        return [draw(element)] * n
    if kind == "ties":
        pool = draw(st.lists(element, min_size=1, max_size=3))
        pool += [-v for v in pool]
        return draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n))
    parts: list[float] = []  # runs of constants and noise, e.g. whole zero blocks
    while len(parts) < n:
        parts += [draw(element)] * draw(st.integers(1, 40))
    return parts[:n]


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=lambda c: str(c))
@PROP
@given(xs=vectors())
def test_pure_and_numpy_are_byte_identical(name: str, params: dict[str, Any],
                                           xs: list[float]) -> None:
    codec = make_codec(name, **params)
    fast = codec.encode(np.asarray(xs, dtype=np.float32))
    pure = codec.encode(array("f", xs))
    assert fast == pure
    assert codec.encode(xs, use_numpy=False) == fast  # a list, forced pure
    dec_fast = codec.decode(fast, len(xs), use_numpy=True)
    dec_pure = codec.decode(fast, len(xs), use_numpy=False)
    assert isinstance(dec_fast, np.ndarray)
    assert isinstance(dec_pure, array)
    assert dec_fast.tobytes() == dec_pure.tobytes()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), rank=st.integers(1, 4),
       shapes=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1,
                       max_size=3))
def test_powersgd_decode_is_byte_identical(seed: int, rank: int,
                                           shapes: list[tuple[int, int]]) -> None:
    layout = layout_of([(f"t{i}", s) for i, s in enumerate(shapes)])
    n = sum(a * b for a, b in shapes)
    x = (np.random.default_rng(seed).standard_t(3, n) * 1e-3).astype(np.float32)
    codec = make_codec("powersgd", rank=rank)
    payload = codec.encode(x, layout=layout)
    fast = codec.decode(payload, n, layout=layout, use_numpy=True)
    pure = codec.decode(payload, n, layout=layout, use_numpy=False)
    assert fast.tobytes() == pure.tobytes()


# -- decoder fuzzing ---------------------------------------------------------------------------
FUZZ_LAYOUT = layout_of([("w", (9, 7)), ("b", (7,)), ("v", (2, 3))])  # 76 values


def seeds() -> dict[str, list[tuple[bytes, int]]]:
    rng = np.random.default_rng(0)
    out: dict[str, list[tuple[bytes, int]]] = {}
    for name, params in [*CONFIGS, ("powersgd", {"rank": 2})]:
        codec = make_codec(name, **params)
        rows = out.setdefault(name, [])
        for n in ((76,) if name == "powersgd" else (1, 2, 17, 64)):
            x = (rng.standard_t(3, n) * 1e-3).astype(np.float32)
            layout = FUZZ_LAYOUT if name == "powersgd" else None
            rows.append((codec.encode(x, layout=layout), n))
    return out


SEEDS = seeds()


def decode_both(data: bytes, length: int, layout: Any) -> None:
    """Both paths raise BadUpdate, or both return the same `length` float32 values."""
    results: list[bytes | None] = []
    for use_numpy in (True, False):
        try:
            out = decode_payload(data, length, layout=layout, use_numpy=use_numpy)
        except BadUpdate:
            results.append(None)
            continue
        assert len(out) == length
        v = np.array(out, np.float32)
        v[np.isnan(v)] = np.nan  # NaN payload bits are unspecified (decode_update refuses)
        results.append(bytes(v.tobytes()))
    assert results[0] == results[1]


@st.composite
def mutations(draw: st.DrawFn, name: str) -> tuple[bytes, int]:
    data, n = draw(st.sampled_from(SEEDS[name]))
    buf = bytearray(data)
    op = draw(st.sampled_from(["flip", "flip", "truncate", "extend", "random", "byte"]))
    if op == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
    elif op == "truncate":
        del buf[draw(st.integers(0, len(buf) - 1)):]
    elif op == "extend":
        buf += draw(st.binary(min_size=1, max_size=20))
    elif op == "byte":
        buf[draw(st.integers(1, len(buf) - 1))] = draw(st.integers(0, 255))
    else:
        buf = bytearray(data[:1]) + bytearray(draw(st.binary(max_size=200)))
    length = draw(st.one_of(st.just(n), st.just(n), st.integers(0, 2 * n + 2)))
    return bytes(buf), length


@pytest.mark.parametrize("name", sorted(SEEDS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decoders_raise_only_bad_update(name: str, data: st.DataObject) -> None:
    payload, length = data.draw(mutations(name))
    decode_both(payload, length, FUZZ_LAYOUT if name == "powersgd" else None)
    if name == "powersgd":
        decode_both(payload, length, None)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=64), length=st.integers(0, 100))
def test_random_bytes_raise_only_bad_update(payload: bytes, length: int) -> None:
    decode_both(payload, length, None)
    decode_both(payload, 76, FUZZ_LAYOUT)
