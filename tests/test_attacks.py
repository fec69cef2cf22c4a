"""shared.attacks: hand-checked small cases, both vector kinds, and ALIE's stealth."""

from __future__ import annotations

import math
import statistics
from array import array

import numpy as np
import pytest

from shared.aggregation import krum, median, trimmed_mean
from shared.attacks import (
    ATTACKS,
    alie,
    alie_z,
    flip_labels,
    gaussian,
    get_attack,
    ipm,
    scaled,
    sign_flip,
)


def test_sign_flip_and_scaled_by_hand() -> None:
    u = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    out = sign_flip(u)
    assert out.dtype == np.float32
    assert out.tolist() == [-1.0, 2.0, -0.5]
    assert sign_flip(u, scale=2.0).tolist() == [-2.0, 4.0, -1.0]
    assert scaled(u, factor=3.0).tolist() == [3.0, -6.0, 1.5]
    a = sign_flip(array("f", [1.0, -2.0]))
    assert isinstance(a, array)
    assert list(a) == [-1.0, 2.0]
    assert list(scaled(array("f", [0.25]), factor=-4)) == [-1.0]


def test_gaussian_is_seeded_noise() -> None:
    u = np.zeros(20000, dtype=np.float32)
    a, b = gaussian(u, sigma=2.0, seed=7), gaussian(u, sigma=2.0, seed=7)
    assert np.array_equal(a, b)
    assert a.dtype == np.float32
    assert not np.array_equal(a, gaussian(u, sigma=2.0, seed=8))
    assert abs(float(a.std()) - 2.0) < 0.05
    assert abs(float(a.mean())) < 0.05
    ones = np.ones(3, dtype=np.float32)
    assert np.allclose(gaussian(ones, sigma=0.0, seed=1, additive=True), ones)
    assert np.allclose(gaussian(ones, sigma=0.0, seed=1), 0.0)
    assert len(gaussian(array("f", [1.0, 2.0]), sigma=1.0, seed=3)) == 2
    with pytest.raises(ValueError, match="must be >= 0"):
        gaussian(ones, sigma=-1.0, seed=0)


def test_alie_z_matches_the_paper_formula() -> None:
    # n = 50, f = 12 (the paper's CIFAR setting): s = floor(26) - 12 = 14, z = Phi^-1(36/50)
    assert alie_z(50, 12) == pytest.approx(statistics.NormalDist().inv_cdf(0.72))
    assert alie_z(50, 12) == pytest.approx(0.5828, abs=1e-4)
    # n = 4, f = 1: s = 3 - 1 = 2 -> Phi^-1(0.5) = 0
    assert alie_z(4, 1) == 0.0
    # n = 8, f = 2: s = 5 - 2 = 3 -> Phi^-1(5/8)
    assert alie_z(8, 2) == pytest.approx(0.318639, abs=1e-5)
    with pytest.raises(ValueError, match="gives s=0"):
        alie_z(4, 3)  # s = 0: (n - s)/n = 1


def test_alie_by_hand() -> None:
    honest = [np.array([1.0, 0.0], dtype=np.float32), np.array([3.0, 0.0], dtype=np.float32)]
    # mean [2, 0], population std [1, 0]; z = 0.5 -> [1.5, 0]
    assert alie(honest, n=3, f=1, z=0.5).tolist() == [1.5, 0.0]
    z = alie_z(8, 2)
    out = alie(honest, n=8, f=2)
    assert out.tolist() == pytest.approx([2.0 - z, 0.0])
    pure = alie([array("f", [1.0, 0.0]), array("f", [3.0, 0.0])], n=8, f=2)
    assert isinstance(pure, array)
    assert list(pure) == pytest.approx([2.0 - z, 0.0])


def test_ipm_by_hand() -> None:
    honest = [np.array([1.0, 2.0], dtype=np.float32), np.array([3.0, -4.0], dtype=np.float32)]
    assert ipm(honest, epsilon=0.5).tolist() == [-1.0, 0.5]
    assert list(ipm([array("f", [2.0]), array("f", [4.0])], epsilon=1.0)) == [-3.0]
    with pytest.raises(ValueError, match="at least one honest update"):
        ipm([], epsilon=1.0)


def test_flip_labels() -> None:
    y = np.array([0, 3, 9], dtype=np.int64)
    out = flip_labels(y, 10)
    assert out.tolist() == [9, 6, 0]
    assert out.dtype == np.int64
    assert flip_labels([0, 1], 2) == [1, 0]
    assert np.array_equal(flip_labels(flip_labels(y, 10), 10), y)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        flip_labels(np.array([10]), 10)


def test_alie_stays_within_the_honest_spread() -> None:
    """Why median/Krum fail against ALIE: every coordinate of the malicious vector lies
    inside the honest per-coordinate range, so neither coordinate-wise nor distance-based
    rules can tell it from an honest update, yet it shifts the aggregate consistently."""
    rng = np.random.default_rng(0)
    n, f, d = 50, 12, 200
    honest = [rng.normal(1.0, 1.0, size=d).astype(np.float32) for _ in range(n - f)]
    bad = alie(honest, n=n, f=f)
    stack = np.stack(honest)
    assert np.all(bad >= stack.min(axis=0))
    assert np.all(bad <= stack.max(axis=0))
    # and it is strictly below the honest mean in every coordinate
    assert np.all(bad < stack.mean(axis=0))
    updates = honest + [bad] * f
    # Krum picks one of the f identical malicious vectors (they sit at distance 0)
    assert np.array_equal(updates[krum(updates, f=f)], bad)
    # the coordinate-wise median moves towards the attacker in (nearly) every coordinate
    honest_median = median(honest)
    assert float(np.mean(median(updates, f=f) < honest_median)) > 0.9
    assert float(np.mean(trimmed_mean(updates, f=f) < stack.mean(axis=0))) > 0.9


def test_registry_calls_every_attack_the_same_way() -> None:
    own = np.array([1.0, -1.0], dtype=np.float32)
    honest = [np.array([1.0, 1.0], dtype=np.float32), np.array([3.0, 1.0], dtype=np.float32)]
    for name, attack in ATTACKS.items():
        out = attack.apply(own=own, honest=honest, n=8, f=2, seed=1)
        assert len(out) == 2, name
        assert all(math.isfinite(float(v)) for v in out), name
    assert get_attack("sign-flip").apply(own=own).tolist() == [-1.0, 1.0]
    assert get_attack("ipm").apply(honest=honest, epsilon=1.0).tolist() == [-2.0, -1.0]
    assert ATTACKS["label-flip"].kind == "data"
    assert not ATTACKS["alie"].uses_own
    assert ATTACKS["sign-flip"].uses_own
    with pytest.raises(ValueError, match="unknown attack"):
        get_attack("nope")
    with pytest.raises(ValueError, match="needs the attacker's own update"):
        get_attack("sign-flip").apply(own=None)
