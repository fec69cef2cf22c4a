"""Client-level DP: the clipping and noise math (shared.dp), the participant applying it in
both vector kinds (numpy natively, array('f') as in the tab), sampling, the schema's ranges
and the accountant's reference values (dp-accounting)."""

from __future__ import annotations

import dataclasses
import math
from array import array
from typing import Any

import numpy as np
import pytest

import shared.vec
from server.config import RunConfig
from server.dp_accountant import epsilon
from shared.codecs import decode_update
from shared.dp import (
    clip_factor,
    clip_vector,
    noise_std,
    poisson_sample,
    privatize,
    sampled,
)
from shared.errors import ProtocolError
from shared.messages import RoundOpen, Submit, decode_message
from tests.test_participant import N, joined, kinds, params, round_open, sent, signed


# -- the math ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["numpy", "array"])
def test_clipping_bounds_the_norm_and_keeps_small_vectors(kind: str) -> None:
    rng = np.random.default_rng(0)
    for scale in (0.01, 0.5, 3.0, 100.0):
        x = (scale * rng.standard_normal(500)).astype(np.float32)
        v: Any = x if kind == "numpy" else array("f", x.tolist())
        out, norm = clip_vector(v, 1.0)
        assert type(out) is type(v)
        got = np.asarray(out, np.float64)
        assert norm == pytest.approx(float(np.linalg.norm(x.astype(np.float64))), rel=1e-6)
        assert np.linalg.norm(got) <= 1.0 + 1e-5
        if norm <= 1.0:
            np.testing.assert_array_equal(got, x)  # untouched
        else:  # scaled, direction kept
            assert np.linalg.norm(got) == pytest.approx(1.0, rel=1e-5)
            np.testing.assert_allclose(got * norm, x, rtol=1e-4, atol=1e-5)
    assert clip_factor(4.0, 2.0) == 0.5
    with pytest.raises(ValueError, match="clip"):
        clip_factor(1.0, 0.0)


def test_noise_share_sums_to_sigma_c() -> None:
    assert noise_std(2.0, 1.1, 4) == pytest.approx(1.1)  # 1.1 x 2 / sqrt(4)
    for m in (1, 10, 256):
        assert math.sqrt(m) * noise_std(0.5, 1.3, m) == pytest.approx(1.3 * 0.5)
    with pytest.raises(ValueError, match="participants"):
        noise_std(1.0, 1.0, 0)


@pytest.mark.parametrize("kind", ["numpy", "array"])
def test_the_sum_of_m_shares_has_std_sigma_c(kind: str) -> None:
    """m participants each privatize zeros; the sum's per-coordinate std is sigma x C (a
    chi-square bound at 200,000 coordinates: +-1.5% is more than 6 standard errors)."""
    m, clip, sigma, n = 8, 0.7, 1.2, 25_000
    like: Any = np.zeros(n, np.float32) if kind == "numpy" else array("f", bytes(4 * n))
    total = np.zeros(n, np.float64)
    for _ in range(m):
        out, norm = privatize(like, clip=clip, sigma=sigma, participants=m)
        assert norm == 0.0
        assert type(out) is type(like)
        total += np.asarray(out, np.float64)
    assert abs(total.mean()) < 5 * sigma * clip / math.sqrt(n)
    assert total.std() == pytest.approx(sigma * clip, rel=0.02)


def test_privatize_is_seeded_only_when_asked() -> None:
    x = np.ones(100, np.float32)
    a, _ = privatize(x, clip=1.0, sigma=1.0, participants=1, seed=7)
    b, _ = privatize(x, clip=1.0, sigma=1.0, participants=1, seed=7)
    c, _ = privatize(x, clip=1.0, sigma=1.0, participants=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    z, _ = privatize(x, clip=1.0, sigma=0.0, participants=1)  # no noise: clipping alone
    assert np.linalg.norm(z) == pytest.approx(1.0, rel=1e-6)


def test_poisson_sampling_rate_and_determinism() -> None:
    nodes = [f"{i:064x}" for i in range(2000)]
    picked, draws = poisson_sample(3, 5, nodes, 0.1)
    assert draws == 1
    assert picked == poisson_sample(3, 5, nodes, 0.1)[0]  # anyone with the seed can check
    assert picked != poisson_sample(3, 6, nodes, 0.1)[0]  # a fresh draw each round
    assert abs(len(picked) - 200) < 5 * math.sqrt(2000 * 0.1 * 0.9)
    assert poisson_sample(3, 5, [], 0.5) == ([], 0)
    # a draw that picks nobody is drawn again, and the draws are counted
    one, draws = poisson_sample(0, 0, ["a" * 64], 0.01)
    assert one == ["a" * 64]
    assert draws > 1
    assert [sampled(0, 0, d, "a" * 64, 0.01) for d in range(draws)] == \
        [False] * (draws - 1) + [True]
    with pytest.raises(ValueError, match="sample rate"):
        sampled(0, 0, 0, "a", 0.0)


# -- the participant applies it ---------------------------------------------------------------
def dp_open(rnd: int, theta: Any, **dp: Any) -> RoundOpen:
    return dataclasses.replace(round_open(rnd, theta), **dp)


@pytest.mark.parametrize("kind", ["numpy", "array"])
def test_participant_clips_and_noises_before_encoding(kind: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The one participant: natively on numpy vectors; as in the tab (no numpy) on array('f')."""
    if kind == "array":
        monkeypatch.setattr(shared.vec, "numpy_module", lambda: None)
    p = joined()
    theta = params(0)
    delta = (10.0 * params(7)).astype(np.float32)  # norm about 80: clipped
    ev = p.receive(signed(dp_open(0, theta, dp_clip=0.5, dp_sigma=0.0, dp_participants=4)))
    assert kinds(ev)[-1] == "train"
    events = p.submit(0, delta.astype("<f4").tobytes(), train_loss=0.5, samples=32,
                      compute_s=0.1)
    msg = sent(events[-1])
    assert isinstance(msg, Submit)
    got = np.asarray(decode_update(msg.payload, N, expect="raw32"), np.float64)
    assert np.linalg.norm(got) == pytest.approx(0.5, rel=1e-5)
    np.testing.assert_allclose(got / 0.5, delta / np.linalg.norm(delta), atol=1e-5)
    assert p.counts["dp_clipped"] == 1
    assert p.counts["dp_updates"] == 1
    # with noise: the update differs from the clipped one by about sigma C / sqrt(m) per value
    ev = p.receive(signed(dp_open(1, theta, dp_clip=0.5, dp_sigma=4.0, dp_participants=4)))
    events = p.submit(1, delta.astype("<f4").tobytes(), train_loss=0.5, samples=32,
                      compute_s=0.1)
    noisy = sent(events[-1])
    assert isinstance(noisy, Submit)
    noise = np.asarray(decode_update(noisy.payload, N, expect="raw32"), np.float64) - got
    assert 0.5 < noise.std() / (4.0 * 0.5 / 2) < 1.6  # 64 values: a loose bound


def test_participant_without_dp_sends_the_update_unchanged() -> None:
    p = joined()
    theta, delta = params(0), (10.0 * params(7)).astype(np.float32)
    p.receive(signed(round_open(0, theta)))
    msg = sent(p.submit(0, delta.tobytes(), train_loss=None, samples=1, compute_s=0.0)[-1])
    assert isinstance(msg, Submit)
    np.testing.assert_array_equal(decode_update(msg.payload, N, expect="raw32"), delta)
    assert "dp_updates" not in p.counts


# -- the schema ------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [("dp_clip", 0.0), ("dp_clip", -1.0),
                                              ("dp_clip", 2e6), ("dp_sigma", -0.1),
                                              ("dp_sigma", 2e6), ("dp_participants", -1)])
def test_roundopen_dp_ranges_are_enforced_at_decode(field: str, value: float) -> None:
    theta = params(0)
    over: dict[str, Any] = {field: value}
    msg = dataclasses.replace(round_open(0, theta), **over)
    with pytest.raises(ProtocolError) as err:
        decode_message(signed(msg))
    assert getattr(err.value, "field", None) == field


def test_run_config_checks_the_dp_keys() -> None:
    for bad in ({"dp_sample_rate": 0.0}, {"dp_sample_rate": 1.5}, {"dp_delta": 1.0},
                {"dp_clip": -1.0}, {"dp_accountant": "gdp"},
                {"dp_epsilon_budget": 3.0},  # a budget needs clipping and noise
                {"dp_sample_rate": 0.5}):  # sampling without DP
        with pytest.raises(ValueError, match=f"config {next(iter(bad))}"):
            RunConfig(**bad)
    RunConfig(dp_clip=1.0, dp_noise_multiplier=1.1, dp_sample_rate=0.1, dp_epsilon_budget=8.0)


# -- the accountant --------------------------------------------------------------------------
def test_accountant_reference_values() -> None:
    """Abadi et al.'s MNIST setting: sigma 1.1, q 256/60000, 14,062 steps, delta 1e-5 gives
    epsilon about 2.60 (RDP) and 2.38-2.39 (PLD), as dp-accounting and opacus report."""
    kw: dict[str, Any] = {"sigma": 1.1, "q": 256 / 60000, "steps": 14062, "delta": 1e-5}
    assert epsilon(**kw, accountant="rdp") == pytest.approx(2.5966, abs=2e-3)
    assert epsilon(**kw, accountant="pld") == pytest.approx(2.385, abs=0.01)
    assert epsilon(**{**kw, "steps": 0}) == 0.0
    assert epsilon(**{**kw, "sigma": 0.0}) == math.inf
    # more steps or less noise can only cost more
    assert epsilon(**{**kw, "steps": 20000}) > epsilon(**kw)
    assert epsilon(**{**kw, "sigma": 0.9}) > epsilon(**kw)
