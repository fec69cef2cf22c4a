"""The numpy path of shared.aggregation over many column blocks (blocks shrunk to a few
columns), against the pure path and against the formulas of the peer libraries (byzfl,
Flower), which bench.agg_speed times: the same answers, at any block size."""

from __future__ import annotations

from array import array
from typing import Any

import numpy as np
import pytest

from shared.aggregation import (
    RULES,
    _stack,
    bulyan_select,
    geometric_median_info,
    krum,
    multi_krum_select,
    nnm,
)

N, D, F = 11, 23, 2  # bulyan needs n >= 4f + 3


@pytest.fixture(params=[3, 7, 10_000], ids=["width3", "width7", "one-block"])
def width(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    w: int = request.param
    monkeypatch.setattr(_stack, "_BLOCK_VALUES", 1)
    monkeypatch.setattr(_stack, "_MIN_WIDTH", w)
    return w


def stack(seed: int, n: int = N, d: int = D, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32) * np.float32(0.5)
    X[0] *= np.float32(30.0)  # an outlier
    return (X + np.float32(offset)).astype(np.float32)


def both(name: str, X: np.ndarray, **kw: Any) -> tuple[list[float], list[float]]:
    rule = RULES[name]
    a = [float(x) for x in rule([array("f", r.tolist()) for r in X], **kw)]
    b = [float(x) for x in rule([r.copy() for r in X], **kw)]
    return a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_numpy_blocks_match_the_pure_path(width: int, seed: int, offset: float) -> None:
    X = stack(seed, offset=offset)
    for name in ("mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan"):
        a, b = both(name, X, f=F)
        assert a == b, name  # bit-identical (no near-tie in these random stacks)
    scale = float(np.abs(X).max())
    for name, kw in (("geometric-median", {}), ("centered-clipping",
                                                {"tau": 2.0, "iterations": 3})):
        a, b = both(name, X, f=F, **kw)
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-6 * scale, name
    pure = [array("f", r.tolist()) for r in X]
    assert [[float(x) for x in v] for v in nnm(list(X), f=F)] == \
        [[float(x) for x in v] for v in nnm(pure, f=F)]


def test_even_count_median_and_sq_distances(width: int) -> None:
    X = stack(3, n=10)
    a, b = both("median", X)
    assert a == b
    ref = np.median(X.astype(np.float64), axis=0)
    assert b == [float(np.float32(v)) for v in ref]
    D_np = _stack.prepare(list(X), "t").sq_distances()
    D_py = _stack.prepare([array("f", r.tolist()) for r in X], "t").sq_distances()
    top = max(max(r) for r in D_py)
    assert all(abs(x - y) <= 1e-12 * top for rp, rn in zip(D_py, D_np, strict=True)
               for x, y in zip(rp, rn, strict=True))
    assert all(D_np[i][i] == 0.0 for i in range(10))
    assert D_np == [list(r) for r in zip(*D_np, strict=True)]  # symmetric, bit for bit


# -- the peers' formulas (what byzfl 0.0.11 and flwr 1.42 compute), written out in numpy --
def flwr_krum_scores(X: np.ndarray, f: int) -> np.ndarray:
    """flwr.server.strategy.aggregate.aggregate_krum: n - f - 2 nearest, squared distances."""
    X64 = X.astype(np.float64)
    D = ((X64[:, None, :] - X64[None, :, :]) ** 2).sum(axis=2)
    k = max(1, len(X) - f - 2)
    return np.array([np.sort(row)[1:k + 1].sum() for row in D])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_same_answers_as_the_peers(width: int, seed: int) -> None:
    X = stack(seed)
    Xs = list(X)
    f32 = np.float32
    # byzfl Average / flwr aggregate; byzfl Median / flwr aggregate_median
    assert np.allclose(RULES["mean"](Xs), X.mean(axis=0), rtol=0, atol=1e-6)
    assert np.array_equal(RULES["median"](Xs), np.median(X, axis=0).astype(f32))
    # byzfl TrMean: sort, drop f each side, mean
    tm = np.sort(X, axis=0)[F:-F].astype(np.float64).mean(axis=0)
    assert np.allclose(RULES["trimmed-mean"](Xs, f=F), tm, rtol=0, atol=1e-6)
    # flwr Krum (n - f - 2 neighbours, as ours) and MultiKrum (the n - f best, averaged)
    scores = flwr_krum_scores(X, F)
    assert krum(Xs, f=F) == int(np.argmin(scores))
    best = list(np.argsort(scores, kind="stable")[:N - F])
    assert sorted(multi_krum_select(Xs, f=F)) == sorted(best)
    assert np.allclose(RULES["multi-krum"](Xs, f=F), X[best].astype(np.float64).mean(axis=0),
                       rtol=0, atol=1e-6)
    # flwr Bulyan's first stage: Krum (n - f - 2 over what is left), theta = n - 2f times.
    # With one neighbour, mutual nearest neighbours tie exactly: Flower takes the first
    # position, ours the lexicographically smallest vector (order-independent).
    left, picked = list(range(N)), []
    for _ in range(N - 2 * F):
        sub = flwr_krum_scores(X[left], F)
        tied = [i for i, s in zip(left, sub, strict=True) if s == sub.min()]
        picked.append(min(tied, key=lambda i: X[i].tolist()))
        left.remove(picked[-1])
    assert bulyan_select(Xs, f=F) == picked
    # byzfl GeometricMedian: the same Weiszfeld map, from 0, T steps; run long enough both
    # end at the same point
    info = geometric_median_info(Xs, tol=1e-12, max_iter=500)
    z = np.zeros(D)
    X64 = X.astype(np.float64)
    for _ in range(500):
        betas = 1.0 / np.maximum(np.linalg.norm(X64 - z, axis=1), 1e-6)
        z = (X64 * betas[:, None]).sum(axis=0) / betas.sum()
    assert np.allclose(info.point, z, rtol=0, atol=1e-5)
    # byzfl CenteredClipping (L steps from m)
    m = np.zeros(D)
    for _ in range(2):
        diff = X64 - m
        clip = np.minimum(1.0, 2.0 / np.linalg.norm(diff, axis=1))
        m = m + (diff * clip[:, None]).mean(axis=0)
    cc = RULES["centered-clipping"](Xs, tau=2.0, iterations=2)
    assert np.allclose(cc, m, rtol=0, atol=1e-6)


def test_geometric_median_on_an_update_takes_the_explicit_steps(width: int) -> None:
    """When the median sits on updates and Weiszfeld converges there, distances from the Gram
    matrix would cancel: the numpy path steps explicitly and still matches the pure path."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal(D).astype(np.float32) * np.float32(1e3)
    X = np.stack([base] * 6 + [base + rng.standard_normal(D).astype(np.float32)
                               for _ in range(3)]).astype(np.float32)
    X[7] += np.float32(1e-3)
    a, b = both("geometric-median", X)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-6 * float(np.abs(X).max())


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_bad_value_in_a_later_block_is_named(width: int, name: str, bad: float) -> None:
    X = stack(0)
    X[4, D - 2] = bad
    with pytest.raises(ValueError, match=rf"update 4 is not finite \({bad} at coordinate "
                                         rf"{D - 2}\)"):
        RULES[name](list(X), f=F)
