"""Update codecs: registry, error budgets, edge cases, top-k, PowerSGD, error feedback.

Property tests (pure == numpy byte identity, decoder fuzzing): test_codecs_props.py;
decode_update, adversarial payloads, golden vectors, runs without numpy: test_codecs_wire.py.
"""

from __future__ import annotations

import math
import struct
from array import array
from typing import Any

import numpy as np
import pytest

from shared.codecs import (
    BY_WIRE_ID,
    CODECS,
    Int8Block,
    PowerSGD,
    Raw32,
    TopK,
    codec_params,
    decode_update,
    get_codec,
    make_codec,
    varint,
    with_error_feedback,
)
from shared.codecs.powersgd import layout_of
from shared.errors import BadUpdate

N = 1 << 17


def gaussian(n: int = N, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 1e-3).astype(np.float32)


def heavy(n: int = N, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_t(3, n) * 1e-3).astype(np.float32)


def rel_err(x: Any, y: Any) -> float:
    x64 = np.asarray(x, np.float64)
    return float(np.linalg.norm(np.asarray(y, np.float64) - x64) / np.linalg.norm(x64))


def round_trip(name: str, x: np.ndarray, **params: Any) -> tuple[bytes, np.ndarray]:
    codec = make_codec(name, **params)
    payload = codec.encode(x)
    out = decode_update(payload, x.size, expect=name)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.shape == x.shape
    return payload, out


# -- registry ----------------------------------------------------------------------------------
def test_registry() -> None:
    assert sorted(CODECS) == ["bf16", "fp16", "int4-block", "int8-block", "powersgd", "raw32",
                              "topk"]
    assert {c.wire_id for c in CODECS.values()} == set(range(7))
    assert all(BY_WIRE_ID[c.wire_id] is c for c in CODECS.values())
    assert get_codec("raw32") == Raw32()
    assert get_codec("raw32") is get_codec("raw32")
    assert get_codec("raw32").name == "raw32"
    assert Raw32().estimated_ratio == pytest.approx(1.0, abs=1e-5)


def test_make_codec_errors() -> None:
    with pytest.raises(ValueError, match="nope") as info:
        make_codec("nope")
    assert "int8-block" in str(info.value)  # lists the known names
    with pytest.raises(ValueError, match="blok") as info:
        make_codec("int8-block", blok=3)
    assert "block" in str(info.value)  # lists the codec's parameters
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("int8-block", {"block": 0}, "block"),
        ("int8-block", {"mode": "max"}, "mode"),
        ("int4-block", {"scale_dtype": "fp8"}, "scale_dtype"),
        ("topk", {"fraction": 0.0}, "fraction"),
        ("topk", {"fraction": 1.5}, "fraction"),
        ("topk", {"values": "int4"}, "values"),
        ("powersgd", {"rank": 0}, "rank"),
    ]
    for name, params, field in cases:
        with pytest.raises(ValueError, match=field):
            make_codec(name, **params)


def test_codecs_are_immutable_values() -> None:
    codec = make_codec("int8-block", block=256, mode="minmax")
    with pytest.raises(AttributeError):
        codec.block = 3  # type: ignore[attr-defined]
    assert codec == make_codec("int8-block", **codec_params(codec))
    assert codec != make_codec("int8-block", block=256)
    assert codec_params(make_codec("topk")) == {"fraction": 0.01, "values": "int8",
                                                "block": 256}


def test_estimated_ratio_matches_real_payloads() -> None:
    x = gaussian()
    for name in ("raw32", "fp16", "bf16", "int8-block", "int4-block", "topk"):
        codec = get_codec(name)
        actual = len(codec.encode(x)) / (4 * x.size)
        assert codec.estimated_ratio == pytest.approx(actual, rel=0.05), name
        assert len(codec.encode(x)) <= codec.max_encoded_size(x.size)


# -- error budgets (rel. L2) -------------------------------------------------------------------
@pytest.mark.parametrize(("name", "params", "budget_gauss", "budget_heavy"), [
    ("raw32", {}, 0.0, 0.0),
    ("fp16", {}, 1e-3, 1e-3),
    ("bf16", {}, 1e-2, 1e-2),
    ("int8-block", {}, 0.01, 0.035),  # default blocks of 1024: heavy tails cost 2.8%
    ("int8-block", {"mode": "minmax"}, 0.01, 0.025),
    ("int8-block", {"block": 64, "mode": "minmax"}, 0.01, 0.01),
    ("int8-block", {"block": 32, "scale_dtype": "fp16"}, 0.01, 0.01),
    ("int4-block", {}, 0.12, 0.20),
    ("int4-block", {"mode": "minmax"}, 0.11, 0.16),
])
def test_error_budget(name: str, params: dict[str, Any], budget_gauss: float,
                      budget_heavy: float) -> None:
    for x, budget in ((gaussian(), budget_gauss), (heavy(), budget_heavy)):
        _, out = round_trip(name, x, **params)
        assert rel_err(x, out) <= budget, (name, params, rel_err(x, out))


def test_fp32_scales_survive_tiny_updates() -> None:
    """Why scale_dtype defaults to fp32: fp16 scales go subnormal for tiny updates."""
    x = gaussian(1 << 16) * np.float32(1e-3)  # std 1e-6
    errors = {}
    for name in ("int8-block", "int4-block"):
        for scale_dtype in ("fp32", "fp16"):
            codec = make_codec(name, scale_dtype=scale_dtype)
            errors[name, scale_dtype] = rel_err(x, codec.decode(codec.encode(x), x.size))
    assert errors["int8-block", "fp32"] < 0.01 < 0.5 < errors["int8-block", "fp16"]
    assert errors["int4-block", "fp32"] < min(0.12, errors["int4-block", "fp16"])


def test_raw32_is_exact_including_signed_zero() -> None:
    v = np.array([0.0, -0.0, 1.5, -3.25, 1e-45, 3.4028234663852886e38], dtype=np.float32)
    payload = get_codec("raw32").encode(v)
    assert payload == b"\x00" + struct.pack("<6f", *v.tolist())
    back = decode_update(payload, 6)
    assert back.tobytes() == v.tobytes()
    assert np.signbit(back[1])


def test_fp16_saturates_and_keeps_subnormals() -> None:
    v = np.array([1e5, -7e4, 65519.0, 65520.0, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -25, -0.0],
                 dtype=np.float32)
    out = get_codec("fp16").decode(get_codec("fp16").encode(v), v.size)
    expected = [65504.0, -65504.0, 65504.0, 65504.0, 2.0 ** -24, 0.0, 2.0 ** -23, -0.0]
    assert out.tolist() == expected
    assert np.signbit(out[-1])
    assert get_codec("fp16").encode(array("f", v.tolist())) == get_codec("fp16").encode(v)


def test_bf16_rounds_to_nearest_even_and_saturates() -> None:
    v = np.array([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3.4028234663852886e38, -3.4e38],
                 dtype=np.float32)
    payload = get_codec("bf16").encode(v)
    assert struct.unpack("<4H", payload[1:]) == (0x3F80, 0x3F82, 0x7F7F, 0xFF7F)


@pytest.mark.parametrize("name", ["raw32", "fp16", "bf16", "int8-block", "int4-block", "topk",
                                  "powersgd"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_encoders_refuse_non_finite(name: str, bad: float) -> None:
    v = np.ones(40, dtype=np.float32)
    v[7] = bad
    layout = layout_of([("w", (5, 8))])
    with pytest.raises(ValueError, match="NaN or infinity"):
        get_codec(name).encode(v, layout=layout)
    if name != "powersgd":
        with pytest.raises(ValueError, match="NaN or infinity"):
            get_codec(name).encode(array("f", v.tolist()))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_empty_vectors(name: str) -> None:
    layout = layout_of([])
    codec = get_codec(name)
    payload = codec.encode(np.zeros(0, np.float32), layout=layout)
    assert len(payload) == codec.max_encoded_size(0, layout=layout)
    for use_numpy in (True, False):
        assert len(codec.decode(payload, 0, layout=layout, use_numpy=use_numpy)) == 0
    if name != "powersgd":
        assert codec.encode(array("f")) == payload


def test_encoders_refuse_matrices() -> None:
    with pytest.raises(ValueError, match="flat"):
        get_codec("fp16").encode(np.zeros((2, 2), np.float32))


def test_int8_constant_and_zero_blocks_are_exact() -> None:
    v = np.array([0.0] * 8 + [0.3] * 8 + [-2.5] * 8 + [-0.0] * 3, dtype=np.float32)
    for mode in ("absmax", "minmax"):
        for scale_dtype in ("fp32", "fp16"):
            codec = make_codec("int8-block", block=8, mode=mode, scale_dtype=scale_dtype)
            out = codec.decode(codec.encode(v), v.size)
            if scale_dtype == "fp32" or mode == "minmax":
                assert out.tolist() == v.tolist(), (mode, scale_dtype)
            else:  # absmax with an fp16 scale: the scale itself is rounded
                assert np.allclose(out, v, rtol=1e-3)


def test_int8_scale_is_stored_then_reused() -> None:
    """q = rint(x / stored_scale) with the STORED (rounded) scale, half to even."""
    v = np.array([127.0, 0.5, 1.5, -2.5, 63.5], dtype=np.float32)  # scale = 1 exactly
    payload = make_codec("int8-block", block=8).encode(v)
    assert struct.unpack("<f", payload[8:12]) == (1.0,)
    assert struct.unpack("<5b", payload[12:]) == (127, 0, 2, -2, 64)  # ties to even


# -- top-k -------------------------------------------------------------------------------------
def test_topk_keeps_largest_exactly_in_fp16() -> None:
    x = heavy(10_000)
    codec = make_codec("topk", fraction=0.01, values="fp16")
    out = codec.decode(codec.encode(x), x.size)
    kept = np.flatnonzero(out)
    assert kept.size == 100
    assert set(kept) == set(np.argsort(-np.abs(x), kind="stable")[:100])
    assert np.array_equal(out[kept], x[kept].astype(np.float16).astype(np.float32))


def test_topk_int8_values_within_half_a_step() -> None:
    x = heavy(20_000)
    codec = make_codec("topk", fraction=0.05, block=256)
    out = codec.decode(codec.encode(x), x.size)
    kept = np.flatnonzero(out)
    assert kept.size == 1000
    for b in range(0, 1000, 256):
        idx = kept[b:b + 256]
        step = np.abs(x[idx]).max() / 127
        assert np.abs(out[idx] - x[idx]).max() <= step * 0.5001
    # per-block scales help with heavy tails (one scale for 100k kept t3 values: 5x worse)
    one = make_codec("topk", fraction=0.05, block=1 << 20)
    err_one = rel_err(x[kept], one.decode(one.encode(x), x.size)[kept])
    assert rel_err(x[kept], out[kept]) < err_one


def test_topk_ties_go_to_the_lower_index() -> None:
    x = np.array([1.0, -2.0, 2.0, 0.5, -2.0, 2.0], dtype=np.float32)
    codec = make_codec("topk", fraction=0.5, values="fp16")  # k = 3
    for v in (x, array("f", x.tolist())):
        out = codec.decode(codec.encode(v), 6)
        assert list(out) == [0.0, -2.0, 2.0, 0.0, -2.0, 0.0]


def test_topk_ratio() -> None:
    x = heavy(1 << 20)
    payload = make_codec("topk", fraction=0.01).encode(x)
    assert 4 * x.size / len(payload) >= 60


def test_varint_known_encodings() -> None:
    values = [0, 1, 127, 128, 300, 16383, 16384, (1 << 32) - 1]
    data = bytes.fromhex("00 01 7f 8001 ac02 ff7f 808001 ffffffff0f")
    assert varint.encode_pure(values) == data
    assert varint.encode_np(np, np.array(values)) == data
    assert varint.decode_pure(data, len(values)) == values
    assert varint.decode_np(np, data, len(values)).tolist() == values
    for bad_data in ("8000", "ffffffff1f", "8080808080", "80", "0000"):
        for decode in (lambda d: varint.decode_pure(d, 1), lambda d: varint.decode_np(np, d, 1)):
            with pytest.raises(BadUpdate):
                decode(bytes.fromhex(bad_data))


# -- PowerSGD ----------------------------------------------------------------------------------
def test_powersgd_recovers_low_rank_matrices_and_sends_the_rest_raw() -> None:
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((60, 3)) @ rng.standard_normal((3, 40))).astype(np.float32)
    bias, small = rng.standard_normal(40).astype(np.float32), np.ones((4, 4), np.float32)
    x = np.concatenate([w.ravel(), bias, small.ravel()])
    layout = layout_of([("w", (60, 40)), ("b", (40,)), ("s", (4, 4))])
    codec = make_codec("powersgd", rank=4)
    payload = codec.encode(x, layout=layout)
    assert len(payload) == codec.max_encoded_size(x.size, layout=layout)
    assert len(payload) == 4 + 4 * 4 * (60 + 40) + 4 * 40 + 4 * 16
    out = decode_update(payload, x.size, layout=layout)
    assert rel_err(x[:2400], out[:2400]) < 1e-5  # rank 3 <= 4: one iteration is exact
    assert out[2400:].tobytes() == x[2400:].tobytes()
    pure = codec.decode(payload, x.size, layout=layout, use_numpy=False)
    assert pure.tobytes() == out.tobytes()  # decode is byte-identical on both paths


def test_powersgd_factors_only_when_smaller_than_raw() -> None:
    codec = make_codec("powersgd", rank=4)
    for shape, low_rank in [((6, 6), False), ((8, 8), False), ((9, 9), True), ((5, 100), True),
                            ((4, 1000), False), ((3, 2, 50), False), ((10, 2, 5), True)]:
        layout = layout_of([("t", shape)])
        n = math.prod(shape)
        size = codec.max_encoded_size(n, layout=layout)
        assert size <= 4 + 4 * n
        assert (size < 4 + 4 * n) is low_rank, shape
        assert len(codec.encode(np.ones(n, np.float32), layout=layout)) == size


def test_powersgd_warm_start_converges() -> None:
    rng = np.random.default_rng(4)
    u, _ = np.linalg.qr(rng.standard_normal((200, 200)))
    v, _ = np.linalg.qr(rng.standard_normal((150, 150)))
    s = np.zeros((200, 150))
    sigma = 0.6 ** np.arange(150)
    np.fill_diagonal(s, sigma)
    x = (u @ s @ v.T).astype(np.float32).ravel()
    layout = layout_of([("w", (200, 150))])
    codec = PowerSGD(rank=4)
    best = np.sqrt((sigma[4:] ** 2).sum() / (sigma ** 2).sum())  # the truncated SVD's error
    state: dict[str, Any] = {}
    errors = []
    for _ in range(8):
        payload, state = codec.encode_with_state(x, layout=layout, state=state)
        errors.append(rel_err(x, codec.decode(payload, x.size, layout=layout)))
    assert state["w"].shape == (150, 4)
    assert errors[0] > 1.5 * best  # one iteration from a random Q is far from the best ...
    assert errors[-1] < best * 1.01  # ... warm starts converge to the truncated SVD
    with pytest.raises(ValueError, match="shape"):
        codec.encode_with_state(x, layout=layout, state={"w": np.zeros((3, 4))})


def test_powersgd_needs_a_matching_layout() -> None:
    x = np.zeros(12, np.float32)
    codec = get_codec("powersgd")
    with pytest.raises(ValueError, match="layout"):
        codec.encode(x)
    with pytest.raises(ValueError, match="pure-Python"):
        codec.encode(x, layout=layout_of([("a", (12,))]), use_numpy=False)
    payload = codec.encode(x, layout=layout_of([("a", (3, 4))]))
    for layout in (None, layout_of([("a", (13,))])):
        with pytest.raises(BadUpdate) as info:
            decode_update(payload, 12, layout=layout)
        assert info.value.field == "layout"
    payload = codec.encode(np.zeros(81, np.float32), layout=layout_of([("a", (9, 9))]))
    with pytest.raises(BadUpdate) as info:  # fits, but the payload has other sizes
        decode_update(payload, 81, layout=layout_of([("a", (81,))]))
    assert info.value.field == "payload"


# -- error feedback ----------------------------------------------------------------------------
def test_error_feedback_transmits_everything_eventually() -> None:
    """topk 1% of a FIXED delta, T rounds: with error feedback the transmitted sum follows
    the true sum T * delta (every coordinate gets its turn; the residual stays bounded, so
    the relative error falls like 1/T); without it the same 1% is sent every round and the
    other 99% of the coordinates stay exactly zero."""
    n = 20_000
    delta = gaussian(n, seed=5)
    codec = make_codec("topk", fraction=0.01, values="fp16")
    sent_ef = np.zeros(n, np.float64)
    sent_plain = np.zeros(n, np.float64)
    residual = None
    err: dict[int, tuple[float, float, float]] = {}  # T -> (EF err, plain err, EF never sent)
    for t in range(1, 401):
        payload, residual = with_error_feedback(codec, delta, residual)
        sent_ef += codec.decode(payload, n)
        sent_plain += codec.decode(codec.encode(delta), n)
        if t in (100, 200, 400):
            true = t * delta.astype(np.float64)
            err[t] = (rel_err(true, sent_ef), rel_err(true, sent_plain),
                      float(np.mean(sent_ef == 0)))
    # measured: EF 0.379 / 0.215 / 0.111 at T = 100 / 200 / 400; plain 0.957 whatever T
    assert err[400][0] < 0.12
    assert err[400][0] < 0.6 * err[200][0]
    assert err[200][0] < 0.6 * err[100][0]
    assert all(plain > 0.95 for _, plain, _ in err.values())
    # never-sent coordinates: plain 99% for ever; EF 51% / 30% / 16% (tiny |delta_i| wait)
    assert float(np.mean(sent_plain == 0)) == pytest.approx(0.99)
    assert err[400][2] < 0.6 * err[200][2]
    assert err[200][2] < 0.7 * err[100][2]
    assert err[400][2] < 0.2
    assert residual is not None  # the residual is exactly what was not transmitted
    np.testing.assert_allclose(400 * delta.astype(np.float64) - sent_ef, residual, atol=1e-5)


def test_with_error_feedback_pure_path_matches() -> None:
    delta, residual = gaussian(500, seed=6), gaussian(500, seed=7)
    codec = make_codec("int8-block", block=64)
    p_np, r_np = with_error_feedback(codec, delta, residual)
    p_py, r_py = with_error_feedback(codec, array("f", delta.tolist()),
                                     array("f", residual.tolist()))
    assert isinstance(r_py, array)
    assert p_np == p_py
    assert r_np.tobytes() == r_py.tobytes()


def test_int8_block_codec_class_defaults() -> None:
    assert Int8Block() == make_codec("int8-block", block=1024, mode="absmax",
                                     scale_dtype="fp32")
    assert TopK().fraction == 0.01


def test_participant_sends_worker_momentum_then_error_feedback_on_numpy() -> None:
    """Natively the participant's vectors are numpy (shared.vec): worker momentum, then the
    codec with error feedback, as every runtime sends them."""
    from shared.messages import Submit
    from tests.test_participant import joined, params, round_open, sent, signed

    rng = np.random.default_rng(3)
    p = joined(worker_momentum=0.5)
    theta = params(0)
    d0, d1 = (rng.standard_normal(len(theta)).astype(np.float32) for _ in range(2))
    out = []
    for rnd, d in enumerate((d0, d1)):
        p.receive(signed(round_open(rnd, theta)))
        events = p.submit(rnd, d.tobytes(), train_loss=None, samples=1, compute_s=0.0)
        msg = sent(events[-1])
        assert isinstance(msg, Submit)
        out.append(np.asarray(make_codec("raw32").decode(msg.payload, len(theta))))
    assert np.array_equal(out[0], d0)
    np.testing.assert_allclose(out[1], 0.5 * d0 + 0.5 * d1, rtol=1e-6)
    assert p.residual is None  # raw32 loses nothing
