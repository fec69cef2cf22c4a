"""Property tests (hypothesis) for shared.aggregation: permutation invariance, the honest hull,
and pure Python == numpy, as exactly as each rule promises (see the package docstring)."""

from __future__ import annotations

import math
from array import array
from typing import Any

import numpy as np
from hypothesis import event, given, settings
from hypothesis import strategies as st

from shared.aggregation import (
    PRE_AGGREGATORS,
    RULES,
    bucketing,
    krum,
    krum_aggregate,
    krum_scores,
    max_f,
    mean,
    median,
    multi_krum,
    nnm,
    trimmed_mean,
)
from shared.aggregation._stack import prepare
from shared.vec import Vector

KINDS = ["numpy", "pure"]
CHECKS_F = {"trimmed-mean", "krum", "multi-krum", "bulyan", "nnm"}  # the others ignore f
APPROX = {"mean", "geometric-median", "centered-clipping"}  # order-dependent sums
SELECTING = {"krum", "multi-krum", "bulyan", "nnm"}  # exact unless a near-tie in distances

INTS = st.integers(-8, 8).map(float)  # every square and sum exact: no rounding anywhere
FLOATS = st.floats(-1e3, 1e3, width=32, allow_nan=False, allow_infinity=False)
HUGE = st.floats(width=32, allow_nan=False, allow_infinity=False)  # up to +-3.4e38

PROPS = settings(max_examples=120, deadline=None)


def stacks(values: st.SearchStrategy[float], min_n: int = 1, max_n: int = 9,
           max_d: int = 4) -> st.SearchStrategy[list[list[float]]]:
    return st.integers(1, max_d).flatmap(lambda d: st.lists(
        st.lists(values, min_size=d, max_size=d), min_size=min_n, max_size=max_n))


def mk(kind: str, rows: list[list[float]]) -> list[Vector]:
    if kind == "numpy":
        return [np.array(r, dtype=np.float32) for r in rows]
    return [array("f", r) for r in rows]


def vals(v: Any) -> list[float]:
    return [float(x) for x in v]


def draw_params(data: st.DataObject, name: str, rows: list[list[float]]
                ) -> dict[str, Any] | None:
    """A valid f (None if n is too small for the rule) and the rule's other parameters."""
    n = len(rows)
    top = max_f(name, n) if name in CHECKS_F else 3
    if top < 0:
        return None
    params: dict[str, Any] = {"f": data.draw(st.integers(0, top), label="f")}
    if name == "centered-clipping":
        params["tau"] = data.draw(st.floats(0.1, 100.0), label="tau")
        params["iterations"] = data.draw(st.integers(1, 3), label="iterations")
        if data.draw(st.booleans(), label="with reference"):
            params["reference"] = data.draw(st.lists(FLOATS, min_size=len(rows[0]),
                                                     max_size=len(rows[0])), label="ref")
    if name == "multi-krum":
        params["m"] = data.draw(st.integers(1, n), label="m")
    if name == "bucketing":
        params["s"] = data.draw(st.integers(1, n + 1), label="s")
        params["seed"] = data.draw(st.integers(0, 2**32), label="seed")
    return params


def run(name: str, kind: str, rows: list[list[float]], params: dict[str, Any]) -> Any:
    p = dict(params)
    if "reference" in p:
        p["reference"] = mk(kind, [p["reference"]])[0]
    fn = {**RULES, **PRE_AGGREGATORS}[name]
    out = fn(mk(kind, rows), **p)
    return [vals(v) for v in out] if isinstance(out, list) else vals(out)


def scale_of(rows: list[list[float]], params: dict[str, Any]) -> float:
    reference: list[float] = params.get("reference", [])
    return max([abs(x) for r in [*rows, reference] for x in r] + [1e-30])


def assert_close(a: list[float], b: list[float], scale: float) -> None:
    """Within 1e-6 relative, measured against the magnitude of the inputs."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-6 * scale, (a, b, scale)


@PROPS
@given(data=st.data(), rows=stacks(FLOATS), name=st.sampled_from([*sorted(RULES), "nnm"]),
       kind=st.sampled_from(KINDS))
def test_permutation_invariance(data: st.DataObject, rows: list[list[float]], name: str,
                                kind: str) -> None:
    params = draw_params(data, name, rows)
    if params is None:
        return
    perm = data.draw(st.permutations(range(len(rows))), label="perm")
    a = run(name, kind, rows, params)
    b = run(name, kind, [rows[i] for i in perm], params)
    if name == "nnm":  # equivariant: the output is permuted alike, exactly
        assert b == [a[i] for i in perm]
    elif name in APPROX:
        assert_close(b, a, scale_of(rows, params))
    else:
        assert b == a


@PROPS
@given(data=st.data(), honest=stacks(FLOATS, max_n=6), kind=st.sampled_from(KINDS))
def test_median_and_trimmed_mean_stay_in_the_honest_hull(data: st.DataObject,
                                                         honest: list[list[float]],
                                                         kind: str) -> None:
    d = len(honest[0])
    f = data.draw(st.integers(0, len(honest) - 1), label="f")  # n = h + f >= 2f + 1
    bad = data.draw(st.lists(st.lists(HUGE, min_size=d, max_size=d), min_size=f, max_size=f),
                    label="arbitrary")
    rows = data.draw(st.permutations(honest + bad), label="stack")
    lo = [min(r[j] for r in honest) for j in range(d)]
    hi = [max(r[j] for r in honest) for j in range(d)]
    for out in (median(mk(kind, rows)), trimmed_mean(mk(kind, rows), f=f)):
        assert all(lo[j] <= x <= hi[j] for j, x in enumerate(vals(out))), (out, lo, hi)


@PROPS
@given(data=st.data(), rows=stacks(INTS),
       name=st.sampled_from(sorted(RULES) + sorted(PRE_AGGREGATORS)))
def test_pure_equals_numpy_exactly_when_no_rounding(data: st.DataObject,
                                                    rows: list[list[float]], name: str) -> None:
    params = draw_params(data, name, rows)
    if params is None:
        return
    a, b = run(name, "pure", rows, params), run(name, "numpy", rows, params)
    if name in {"geometric-median", "centered-clipping"}:
        assert_close(a, b, scale_of(rows, params))
    else:
        assert a == b


@PROPS
@given(data=st.data(), rows=stacks(FLOATS),
       name=st.sampled_from(sorted(RULES) + sorted(PRE_AGGREGATORS)))
def test_pure_matches_numpy(data: st.DataObject, rows: list[list[float]], name: str) -> None:
    params = draw_params(data, name, rows)
    if params is None:
        return
    a, b = run(name, "pure", rows, params), run(name, "numpy", rows, params)
    if name in {"geometric-median", "centered-clipping"}:
        assert_close(a, b, scale_of(rows, params))
        return
    if name not in SELECTING:  # mean, median, trimmed-mean, bucketing: always bit-identical
        assert a == b
        return
    d_py = prepare(mk("pure", rows), name).sq_distances()
    d_np = prepare(mk("numpy", rows), name).sq_distances()
    top = max(max(r) for r in d_py) or 1.0
    assert all(abs(x - y) <= 1e-12 * top for rp, rn in zip(d_py, d_np, strict=True)
               for x, y in zip(rp, rn, strict=True))
    if d_py == d_np:  # same distances: the shared selection and averaging give the same bits
        event("distances bit-identical")
        assert a == b
    else:  # rounding apart: only a near-tie could change a choice; scores still agree
        event("distances differ in rounding")
        if name in {"krum", "multi-krum"}:
            f = params["f"]
            sp, sn = krum_scores(mk("pure", rows), f=f), krum_scores(mk("numpy", rows), f=f)
            tol = 1e-12 * max(max(sp), 1e-300)
            assert all(abs(x - y) <= tol for x, y in zip(sp, sn, strict=True))
            if a != b:  # a choice flipped: only possible between two scores within rounding
                assert any(0 < abs(x - y) <= 1e3 * tol for x in sp for y in sp), (sp, sn)


@PROPS
@given(rows=stacks(FLOATS, min_n=3), kind=st.sampled_from(KINDS), data=st.data())
def test_krum_family_consistency(rows: list[list[float]], kind: str,
                                 data: st.DataObject) -> None:
    f = data.draw(st.integers(0, max_f("krum", len(rows))), label="f")
    ups = mk(kind, rows)
    i = krum(ups, f=f)
    assert vals(krum_aggregate(ups, f=f)) == rows[i]  # a copy of one of the inputs
    assert vals(multi_krum(ups, f=f, m=1)) == rows[i]
    scores = krum_scores(ups, f=f)
    assert scores[i] == min(scores)


@PROPS
@given(rows=stacks(FLOATS), kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32))
def test_bucketing_and_nnm_shapes(rows: list[list[float]], kind: str, seed: int) -> None:
    n = len(rows)
    ups = mk(kind, rows)
    again = [vals(v) for v in bucketing(ups, s=2, seed=seed)]
    assert [vals(v) for v in bucketing(ups, s=2, seed=seed)] == again  # seeded: repeatable
    assert sorted(vals(v) for v in bucketing(ups, s=1, seed=seed)) == sorted(rows)
    for s in range(1, n + 1):
        out = bucketing(ups, s=s, seed=seed)
        assert len(out) == math.ceil(n / s)
        if n % s == 0:  # equal buckets: the mean of the bucket means is the mean
            assert_close(vals(mean(out)), vals(mean(ups)), scale_of(rows, {}))
    mixed = nnm(ups)  # f = 0: every update becomes the mean of all
    assert len(mixed) == n
    for v in mixed:
        assert_close(vals(v), vals(mean(ups)), scale_of(rows, {}))
