"""The numpy path of shared.aggregation reads the callers' float32 arrays in column blocks:
no copy of the stack (bounded extra memory), and the same bits as the pure path at the edges
the fast loops touch (signed zeros, the origin shortcut of centered clipping)."""

from __future__ import annotations

import tracemalloc
from array import array

import numpy as np
import pytest

from shared.aggregation import RULES, centered_clipping, mean, median, trimmed_mean

N, D = 16, 300_000


@pytest.mark.parametrize("name", sorted(RULES))
def test_no_copy_of_the_stack(name: str) -> None:
    rng = np.random.default_rng(0)
    X = [rng.standard_normal(D, dtype=np.float32) for _ in range(N)]
    stack_bytes = N * D * 4
    tracemalloc.start()
    try:
        out = RULES[name](X, f=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.dtype == np.float32
    assert out.shape == (D,)
    # the result and a few float64 blocks; a stacked copy alone would be 1.0 (2.0 in float64)
    assert peak < 0.6 * stack_bytes, f"{name}: peak {peak / stack_bytes:.2f} x the stack"


def _bits(v: object) -> list[tuple[float, bool]]:
    return [(float(x), np.signbit(np.float32(x)).item()) for x in v]  # type: ignore[attr-defined]


def test_signed_zeros_agree_with_the_pure_path() -> None:
    X = np.array([[-0.0, -0.0, 1.0, -0.0], [-0.0, 0.0, -1.0, -0.0], [-0.0, -0.0, 0.0, 2.0]],
                 dtype=np.float32)
    pure = [array("f", r.tolist()) for r in X]
    for rule in (mean, median, trimmed_mean):
        f = 1 if rule is trimmed_mean else 0
        a, b = rule([r.copy() for r in X], f=f), rule(pure, f=f)
        assert _bits(a) == _bits(b), rule.__name__
    assert _bits(mean(list(X)))[0] == (0.0, False)  # a sum of -0.0s starts at +0, as numpy's
    assert _bits(mean([X[0]])) == _bits(mean([array("f", X[0].tolist())]))


def test_centered_clipping_from_the_origin_is_the_zero_reference() -> None:
    rng = np.random.default_rng(1)
    X = [rng.standard_normal(1000, dtype=np.float32) * np.float32(s) for s in (1, 3, 50, 0.1)]
    for it in (1, 3):
        a = centered_clipping(X, tau=5.0, iterations=it)
        b = centered_clipping(X, tau=5.0, iterations=it, reference=np.zeros(1000, np.float32))
        assert a.tobytes() == b.tobytes()


def test_mean_is_the_float32_running_sum_and_float64_where_it_overflows() -> None:
    rng = np.random.default_rng(2)
    X = rng.standard_normal((9, 1000), dtype=np.float32)
    want = X[0] + np.float32(0.0)
    for r in X[1:]:
        want = want + r  # float32, row after row: byzfl's and Flower's mean
    want = want / np.float32(9)
    got = mean(list(X))
    assert got.tobytes() == want.tobytes()
    assert got.tobytes() == mean([array("f", r.tolist()) for r in X]).tobytes()
    # finite updates whose float32 sum overflows: the float64 mean, on both paths
    # finite updates whose float32 sum overflows in some columns: those columns alone are
    # summed in float64 (column 1 keeps its float32 sum, which float64 would round up)
    big = np.full((3, 4), 3e38, dtype=np.float32)
    big[:, 1] = [1.0, 5e-8, 5e-8]
    one = (np.float32(1.0) + np.float32(5e-8) + np.float32(5e-8)) / np.float32(3)
    assert one != np.float32((1.0 + 2 * float(np.float32(5e-8))) / 3)
    for kind in (list(big), [array("f", r.tolist()) for r in big]):
        top = float(np.float32(3e38))
        assert [float(x) for x in mean(kind)] == [top, float(one), top, top]
    bad = list(X[:3].copy())
    bad[1][5] = np.nan
    with pytest.raises(ValueError, match="update 1 is not finite"):
        mean(bad)
