"""shared.aggregation: hand-computed tiny cases for every rule, validation, the registry, and
robustness demos. Every hand case runs on both backends (numpy and pure Python array('f')).
Property tests (hypothesis) live in test_aggregation_props.py."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from shared.aggregation import (
    PRE_AGGREGATORS,
    RULES,
    bucketing,
    bulyan,
    bulyan_select,
    centered_clipping,
    estimate_f,
    geometric_median,
    geometric_median_info,
    get_pre_aggregator,
    get_rule,
    krum,
    krum_aggregate,
    krum_scores,
    max_f,
    mean,
    median,
    multi_krum,
    multi_krum_select,
    nnm,
    trimmed_mean,
)
from shared.vec import Vector

KINDS = ["numpy", "pure"]
ROOT = Path(__file__).resolve().parent.parent


def mk(kind: str, rows: Sequence[Sequence[float]]) -> list[Vector]:
    """A stack of float32 updates of the given kind."""
    if kind == "numpy":
        return [np.array(r, dtype=np.float32) for r in rows]
    return [array("f", r) for r in rows]


def vals(v: object) -> list[float]:
    assert isinstance(v, np.ndarray | array)
    return [float(x) for x in v]


def f32(x: float) -> float:
    return float(np.float32(x))


def check_kind(kind: str, out: object) -> None:
    if kind == "numpy":
        assert isinstance(out, np.ndarray)
        assert out.dtype == np.float32
    else:
        assert type(out) is array
        assert out.typecode == "f"


# -- mean, median, trimmed mean ------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_mean_hand_case(kind: str) -> None:
    # (1 + 3 + 2) / 3 = 2, (-2 + 2 + 3) / 3 = 1, (3 + 0 - 6) / 3 = -1; f is ignored
    out = mean(mk(kind, [[1, -2, 3], [3, 2, 0], [2, 3, -6]]), f=1)
    check_kind(kind, out)
    assert vals(out) == [2.0, 1.0, -1.0]


@pytest.mark.parametrize("kind", KINDS)
def test_median_odd_and_even_counts(kind: str) -> None:
    # odd: columns sorted (1, 3, 5) and (-1, 4, 9): the middle values
    out = median(mk(kind, [[1, 9], [5, -1], [3, 4]]))
    check_kind(kind, out)
    assert vals(out) == [3.0, 4.0]
    # even: sorted (1, 2, 3, 10) -> (2 + 3) / 2 = 2.5; (10, 20, 30, 40) -> (20 + 30) / 2 = 25
    assert vals(median(mk(kind, [[1, 40], [2, 10], [3, 30], [10, 20]]))) == [2.5, 25.0]
    # one outlier of 1e6 does not move it: sorted (1, 2, 3, 1e6) -> 2.5
    assert vals(median(mk(kind, [[1], [2], [3], [1e6]]))) == [2.5]


@pytest.mark.parametrize("kind", KINDS)
def test_trimmed_mean_hand_case(kind: str) -> None:
    ups = mk(kind, [[1, -5], [2, 0], [3, 7], [100, 1], [-50, 2]])
    # f=1: column 0 sorted (-50, 1, 2, 3, 100) -> (1 + 2 + 3) / 3 = 2;
    #      column 1 sorted (-5, 0, 1, 2, 7)   -> (0 + 1 + 2) / 3 = 1
    out = trimmed_mean(ups, f=1)
    check_kind(kind, out)
    assert vals(out) == [2.0, 1.0]
    # f=2 keeps only the middle value (= the median); f=0 is the mean (56/5, 5/5)
    assert vals(trimmed_mean(ups, f=2)) == [2.0, 1.0]
    assert vals(trimmed_mean(ups, f=0)) == [f32(56 / 5), 1.0]
    with pytest.raises(ValueError, match=r"f=3 needs n >= 2f \+ 1 = 7 updates, got n=5"):
        trimmed_mean(ups, f=3)


# -- Krum, multi-Krum, Bulyan --------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_krum_three_scalars(kind: str) -> None:
    # n=3, f=0: n - f - 2 = 1 nearest neighbour. Squared distances:
    #   d(0.2, 0.7) = 0.25, d(0.2, 1.0) = 0.64, d(0.7, 1.0) = 0.09
    # scores: 0.2 -> 0.25, 0.7 -> min(0.25, 0.09) = 0.09, 1.0 -> min(0.64, 0.09) = 0.09.
    # 0.7 and 1.0 tie exactly (the same pair distance), and the tie goes to the smaller
    # vector: index 1. (With n - f - 1 = 2 neighbours the scores would be 0.89, 0.34, 0.73:
    # also index 1.) In float32, 0.7 - 1.0 is 0.30000001192..., hence the f32 arithmetic.
    ups = mk(kind, [[0.2], [0.7], [1.0]])
    assert krum(ups, f=0) == 1
    a, b, c = f32(0.2), f32(0.7), 1.0
    assert krum_scores(ups) == [(b - a) ** 2, (c - b) ** 2, (c - b) ** 2]
    out = krum_aggregate(ups)
    check_kind(kind, out)
    assert vals(out) == [b]


@pytest.mark.parametrize("kind", KINDS)
def test_krum_five_scalars_one_outlier(kind: str) -> None:
    # n=5, f=1: 5 - 1 - 2 = 2 nearest neighbours. Squared distances from each point:
    #   1: 4 (3), 9 (4), 16 (5), 9801 (100)        -> 4 + 9 = 13
    #   3: 1 (4), 4 (5), 4 (1), 9409 (100)         -> 1 + 4 = 5
    #   4: 1 (3), 1 (5), 9 (1), 9216 (100)         -> 1 + 1 = 2   <- lowest: the median
    #   5: 1 (4), 4 (3), 16 (1), 9025 (100)        -> 1 + 4 = 5
    #   100: 9025 (5), 9216 (4), ...               -> 9025 + 9216 = 18241
    ups = mk(kind, [[1], [3], [4], [5], [100]])
    assert krum_scores(ups, f=1) == [13.0, 5.0, 2.0, 5.0, 18241.0]
    assert krum(ups, f=1) == 2
    assert vals(krum_aggregate(ups, f=1)) == [4.0]
    # multi-Krum: ranked 4 (2), then 3 and 5 (both 5; the tie goes to the smaller), then 1
    assert multi_krum_select(ups, f=1, m=3) == [2, 1, 3]
    assert vals(multi_krum(ups, f=1, m=3)) == [4.0]  # (4 + 3 + 5) / 3
    assert vals(multi_krum(ups, f=1)) == [3.25]  # m = n - f = 4: (4 + 3 + 5 + 1) / 4
    assert vals(multi_krum(ups, f=1, m=1)) == vals(krum_aggregate(ups, f=1))


@pytest.mark.parametrize("kind", KINDS)
def test_krum_two_dimensions(kind: str) -> None:
    # a=(0,0) b=(1,0) c=(0,1) d=(10,10), f=0 -> 2 neighbours. |a-b|^2 = |a-c|^2 = 1,
    # |b-c|^2 = 2, |a-d|^2 = 200, |b-d|^2 = |c-d|^2 = 81 + 100 = 181.
    # scores: a 1 + 1 = 2, b 1 + 2 = 3, c 1 + 2 = 3, d 181 + 181 = 362 -> a
    ups = mk(kind, [[0, 0], [1, 0], [0, 1], [10, 10]])
    assert krum_scores(ups) == [2.0, 3.0, 3.0, 362.0]
    assert krum(ups) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_bulyan_seven_points(kind: str) -> None:
    # n=7, f=1 (7 >= 4f + 3): theta = 7 - 2 = 5 picks by repeated Krum, beta = 5 - 2 = 3.
    # Points 1, 3, 6, 7, 8, 11 and an outlier 60. Squared distances, e.g. from 7:
    # 36 (1), 16 (3), 1 (6), 1 (8), 16 (11).
    # pick 1: r=7, 4 neighbours: 1 -> 4+25+36+49=114, 3 -> 4+9+16+25=54, 6 -> 1+4+9+25=39,
    #         7 -> 1+1+16+16=34, 8 -> 1+4+9+25=39, 11 -> 9+16+25+64=114, 60 -> 10830: 7
    # pick 2: r=6, 3 neighbours: 1 -> 4+25+49=78, 3 -> 4+9+25=38, 6 -> 4+9+25=38,
    #         8 -> 4+9+25=38, 11 -> 9+25+64=98: a three-way tie, the smallest wins: 3
    # pick 3: r=5, 2 neighbours: 1 -> 25+49=74, 6 -> 4+25=29, 8 -> 4+9=13, 11 -> 9+25=34: 8
    # pick 4: r=4, 1 neighbour: 1 -> 25, 6 -> 25, 11 -> 25, 60 -> 2401: tie, smallest: 1
    # pick 5: r=3, max(3-1-2, 1) = 1 neighbour: 6 -> 25, 11 -> 25, 60 -> 2401: 6
    # stage 2: selected sorted (1, 3, 6, 7, 8), median 6, distances 5, 3, 0, 1, 2:
    # the 3 closest are 6, 7, 8 -> 21 / 3 = 7 (a plain trimmed mean would give 16/3).
    ups = mk(kind, [[1], [3], [6], [7], [8], [11], [60]])
    assert bulyan_select(ups, f=1) == [3, 1, 4, 0, 2]
    out = bulyan(ups, f=1)
    check_kind(kind, out)
    assert vals(out) == [7.0]
    with pytest.raises(ValueError, match=r"bulyan: f=2 needs n >= 4f \+ 3 = 11"):
        bulyan(ups, f=2)


def test_krum_bounds_name_f() -> None:
    ups = mk("numpy", [[0], [1], [2], [3]])
    for fn in (krum, krum_scores, krum_aggregate, multi_krum, multi_krum_select):
        with pytest.raises(ValueError, match=r"f=1 needs n >= 2f \+ 3 = 5 updates, got n=4"):
            fn(ups, f=1)
    with pytest.raises(ValueError, match="m=5 must be in"):
        multi_krum(ups, f=0, m=5)
    with pytest.raises(ValueError, match="m=0 must be in"):
        multi_krum(ups, f=0, m=0)


# -- geometric median, centered clipping ---------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_geometric_median_hand_cases(kind: str) -> None:
    # three collinear points: the middle one (moving toward either end adds as much to one
    # distance as it removes from the other, and also moves away from the middle point)
    res = geometric_median_info(mk(kind, [[0, 0], [1, 1], [5, 5]]))
    assert res.converged
    assert vals(res.point) == pytest.approx([1, 1], abs=1e-5)
    # a symmetric configuration (square around (3, -2)): its centre
    sq = geometric_median(mk(kind, [[2, -1], [4, -1], [2, -3], [4, -3]]))
    check_kind(kind, sq)
    assert vals(sq) == pytest.approx([3, -2], abs=1e-6)
    # equilateral triangle: the centre (1, sqrt(3)/3); the start (coordinate-wise median
    # (1, 0)) is off, so this takes real Weiszfeld steps
    tri = geometric_median_info(mk(kind, [[0, 0], [2, 0], [1, math.sqrt(3)]]))
    assert tri.converged
    assert tri.iterations > 3
    assert vals(tri.point) == pytest.approx([1, math.sqrt(3) / 3], abs=1e-5)
    # (1,1) among (0,0), (10,0), (0,10): the unit vectors from (1,1) to the others sum to
    # ~(0.18, 0.18), norm 0.25 <= 1, so (1,1) itself is the median; the start is (0.5, 0.5)
    pt = geometric_median(mk(kind, [[0, 0], [10, 0], [0, 10], [1, 1]]))
    assert vals(pt) == pytest.approx([1, 1], abs=1e-5)
    # max_iter runs out: the point so far, converged False
    short = geometric_median_info(mk(kind, [[0, 0], [2, 0], [1, math.sqrt(3)]]), max_iter=2)
    assert short.iterations == 2
    assert not short.converged


@pytest.mark.parametrize("kind", KINDS)
def test_centered_clipping_hand_case(kind: str) -> None:
    # v0 = 0, tau = 2: x1 - v0 = (3, 4), norm 5 > 2 -> scaled by 2/5 to (1.2, 1.6);
    # x2 - v0 = (0, 1), norm 1 <= 2 -> kept. v1 = 0 + ((1.2, 1.6) + (0, 1)) / 2 = (0.6, 1.3)
    out = centered_clipping(mk(kind, [[3, 4], [0, 1]]), tau=2.0)
    check_kind(kind, out)
    assert vals(out) == [f32(0.6), f32(1.3)]
    # from reference (3, 4): x1 - v0 = 0 (kept), x2 - v0 = (-3, -3), norm 4.24 -> scaled
    # by 2/4.243 to (-1.414, -1.414); v1 = (3, 4) + (-0.7071, -0.7071)
    ref = mk(kind, [[3, 4]])[0]
    out = centered_clipping(mk(kind, [[3, 4], [0, 1]]), tau=2.0, reference=ref)
    assert vals(out) == pytest.approx([3 - math.sqrt(0.5), 4 - math.sqrt(0.5)], rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_centered_clipping_large_and_small_tau(kind: str) -> None:
    rows = [[1.0, -2.0, 0.5], [3.0, 0.0, 2.5], [-1.0, 4.0, 0.0], [2.0, 1.0, -1.0]]
    ups = mk(kind, rows)
    ref = mk(kind, [[10.0, 10.0, 10.0]])[0]
    # tau larger than every ||x_i - v|| clips nothing: v + mean(x_i - v) = mean(x)
    big = centered_clipping(ups, tau=1e6, reference=ref)
    assert vals(big) == pytest.approx(vals(mean(ups)), rel=1e-6, abs=1e-6)
    # a small tau moves v at most tau per iteration
    tau, v = 0.25, ref
    for _ in range(5):
        nxt = centered_clipping(ups, tau=tau, reference=v)
        assert math.dist(vals(nxt), vals(v)) <= tau * (1 + 1e-6)
        v = nxt
    many = centered_clipping(ups, tau=tau, iterations=5, reference=ref)
    assert vals(many) == pytest.approx(vals(v), rel=1e-6)
    with pytest.raises(ValueError, match="reference has length 2"):
        centered_clipping(ups, reference=mk(kind, [[0, 0]])[0])
    with pytest.raises(ValueError, match="tau"):
        centered_clipping(ups, tau=0)


# -- pre-aggregators -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_bucketing_hand_case(kind: str) -> None:
    ups = mk(kind, [[1], [2], [4], [8], [16]])
    order = list(range(5))
    random.Random(7).shuffle(order)
    assert order == [4, 0, 3, 1, 2]  # pinned: the same permutation everywhere, Pyodide too
    # buckets of s=2: (16 + 1) / 2 = 8.5, (8 + 2) / 2 = 5, and the short last one: 4
    out = bucketing(ups, s=2, seed=7)
    for v in out:
        check_kind(kind, v)
    assert [vals(v) for v in out] == [[8.5], [5.0], [4.0]]
    # s >= n: one bucket, the mean; s = 1: the updates, shuffled
    assert [vals(v) for v in bucketing(ups, s=5, seed=1)] == [[f32(31 / 5)]]
    assert [vals(v) for v in bucketing(ups, s=9, seed=1)] == [vals(mean(ups))]
    assert sorted(vals(v)[0] for v in bucketing(ups, s=1, seed=3)) == [1, 2, 4, 8, 16]
    # then any rule: median of (8.5, 5, 4) = 5
    assert vals(median(bucketing(ups, s=2, seed=7))) == [5.0]
    with pytest.raises(ValueError, match="s=0"):
        bucketing(ups, s=0, seed=1)
    with pytest.raises(ValueError, match="seed"):
        bucketing(ups, s=2, seed=1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
def test_nnm_hand_case(kind: str) -> None:
    # n=4, f=1: each update -> mean of its n - f = 3 nearest, itself included:
    #   0 -> {0, 1, 2} = 1;  1 -> {1, 0, 2} = 1;  2 -> {2, 1, 0} = 1 (0 is 2 away, 10 is 8)
    #   10 -> {10, 2, 1} = 13/3
    out = nnm(mk(kind, [[0], [1], [2], [10]]), f=1)
    assert [vals(v) for v in out] == [[1.0], [1.0], [1.0], [f32(13 / 3)]]
    # f = 0: every update becomes the mean
    assert [vals(v) for v in nnm(mk(kind, [[0], [1], [2], [10]]))] == [[3.25]] * 4
    with pytest.raises(ValueError, match=r"nnm: f=2 needs n >= 2f \+ 1 = 5"):
        nnm(mk(kind, [[0], [1], [2], [10]]), f=2)


# -- validation ----------------------------------------------------------------------------
ALL = {**RULES, **PRE_AGGREGATORS}
CHECKS_F = {"trimmed-mean", "krum", "multi-krum", "bulyan", "nnm"}  # the others ignore f


def call(name: str, ups: list[Vector], **kw: object) -> object:
    if name == "bucketing":
        kw.setdefault("seed", 0)
    return ALL[name](ups, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(ALL))
def test_every_rule_validates_its_input(name: str, kind: str) -> None:
    with pytest.raises(ValueError, match=rf"{name}: no updates"):
        call(name, [])
    with pytest.raises(ValueError, match="update 2 has length 2, update 0 has length 3"):
        call(name, mk(kind, [[0, 0, 0], [1, 1, 1], [2, 2]]))
    for bad in (math.nan, math.inf, -math.inf):
        rows = [[0.0, 0.0, 0.0] for _ in range(11)]
        rows[4][1] = bad
        with pytest.raises(ValueError, match=r"update 4 is not finite \(.* at coordinate 1\)"):
            call(name, mk(kind, rows))
    ok = mk(kind, [[float(i), float(-i)] for i in range(11)])
    for f in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="f"):
            call(name, ok, f=f)
    with pytest.raises(TypeError):
        call(name, ok, no_such_param=1)
    if name in CHECKS_F:
        with pytest.raises(ValueError, match="f=11 needs n"):
            call(name, ok, f=11)


def test_nested_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="update 1 is not a flat vector"):
        median([np.zeros(4, np.float32), np.zeros((2, 2), np.float32)])


def test_mixed_kinds_take_the_pure_path_and_agree() -> None:
    ups = [np.array([1, 2], np.float32), array("f", [3, 5]), np.array([8, 0], np.float32)]
    assert vals(median(ups)) == [3.0, 2.0]
    assert vals(mean(ups)) == [4.0, f32(7 / 3)]


# -- registry --------------------------------------------------------------------------------
def test_registry_names_and_lookup() -> None:
    assert sorted(RULES) == sorted(["mean", "median", "trimmed-mean", "krum", "multi-krum",
                                    "bulyan", "geometric-median", "centered-clipping"])
    assert sorted(PRE_AGGREGATORS) == ["bucketing", "nnm"]
    assert get_rule("mean") is mean
    assert get_rule("krum") is krum_aggregate
    assert get_pre_aggregator("nnm") is nnm
    with pytest.raises(ValueError, match="unknown aggregator 'krum-ish'") as info:
        get_rule("krum-ish")
    assert "multi-krum" in str(info.value)
    with pytest.raises(ValueError, match="known: \\['bucketing', 'nnm'\\]"):
        get_pre_aggregator("mix")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_is_callable_by_name_with_f(name: str, kind: str) -> None:
    ups = mk(kind, [[i, 2 * i, -i] for i in range(7)])
    out = get_rule(name)(ups, f=1)
    check_kind(kind, out)
    assert len(out) == 3
    get_rule(name)(ups)  # f defaults to 0 (the coordinator calls rule(vectors) today)


def test_estimate_f_and_max_f() -> None:
    assert estimate_f(10, 0.2) == 2
    assert estimate_f(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floats
    assert estimate_f(7, 0.0) == 0
    assert estimate_f(10, 0.45) == 4
    assert estimate_f(10, 0.45, rule="krum") == 3  # (10 - 3) // 2
    assert estimate_f(10, 0.45, rule="bulyan") == 1  # (10 - 3) // 4
    assert estimate_f(10, 0.45, rule="mean") == 0
    assert max_f("trimmed-mean", 5) == 2
    assert max_f("nnm", 5) == 2
    assert max_f("krum", 3) == 0
    with pytest.raises(ValueError, match="cannot aggregate n=2"):
        estimate_f(2, 0.1, rule="krum")
    for bad in (-0.1, 1.0, math.nan):
        with pytest.raises(ValueError, match="fraction"):
            estimate_f(10, bad)
    with pytest.raises(ValueError, match="unknown aggregator"):
        max_f("nope", 3)


# -- robustness demos --------------------------------------------------------------------------
def attacked_stack(kind: str, seed: int, n_honest: int = 12, f: int = 3, d: int = 8,
                   spread: float = 0.1) -> tuple[list[Vector], np.ndarray]:
    """n_honest updates around (1, 1, ...) and f outliers of magnitude ~1e6, shuffled."""
    rng = np.random.default_rng(seed)
    honest = 1.0 + spread * rng.standard_normal((n_honest, d))
    bad = 1e6 * np.sign(rng.standard_normal((f, d)))
    rows = np.concatenate([honest, bad]).astype(np.float32)
    rows = rows[rng.permutation(len(rows))]
    return mk(kind, rows.tolist()), honest.astype(np.float32).mean(axis=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_robust_rules_shrug_off_outliers(kind: str, seed: int) -> None:
    f = 3
    ups, honest_mean = attacked_stack(kind, seed, f=f)
    err = {name: float(np.max(np.abs(np.array(vals(rule(ups, f=f))) - honest_mean)))
           for name, rule in RULES.items() if name != "centered-clipping"}
    # the previous round's aggregate as reference: here, the honest centre (1, ..., 1)
    ref = mk(kind, [[1.0] * 8])[0]
    cc = centered_clipping(ups, tau=0.5, iterations=3, reference=ref)
    err["centered-clipping"] = float(np.max(np.abs(np.array(vals(cc)) - honest_mean)))
    # from zero (no history yet): 10 steps of at most 0.5 reach the honest centre (norm 2.8)
    cold = centered_clipping(ups, tau=0.5, iterations=10)
    err["centered-clipping, cold"] = float(np.max(np.abs(np.array(vals(cold)) - honest_mean)))
    pre = {"bucketing+median": median(bucketing(ups, s=2, seed=seed), f=f),
           "nnm+trimmed-mean": trimmed_mean(nnm(ups, f=f), f=f),
           "nnm+krum": krum_aggregate(nnm(ups, f=f), f=f)}
    for name, out in pre.items():
        err[name] = float(np.max(np.abs(np.array(vals(out)) - honest_mean)))
    assert err.pop("mean") > 1e5  # the plain mean is dragged ~f/n * 1e6 away
    # median of 15 with 3 outliers, Krum picks one honest update, ...: all within about the
    # honest spread (0.1 per coordinate) of the honest mean (measured: 0.03-0.11)
    assert max(err.values()) < 0.25, err


# -- the browser: no numpy at all ------------------------------------------------------------
BROWSER = """
import sys, types
sys.modules["_pyodide_core"] = types.ModuleType("_pyodide_core")  # what Pyodide has
sys.modules["numpy"] = None  # importing numpy now fails
from array import array
from shared.aggregation import PRE_AGGREGATORS, RULES, krum
ups = [array("f", [x, -x]) for x in (1.0, 3.0, 6.0, 7.0, 8.0, 11.0, 60.0)]
assert krum(ups, f=1) == 3  # see test_bulyan_seven_points: 7 scores 1+1+16+16 = 34
out = {name: list(rule(ups, f=1)) for name, rule in RULES.items()}
for name in ("median", "trimmed-mean", "krum", "bulyan"):  # trimmed: (3+6+7+8+11)/5 = 7
    assert out[name] == [7.0, -7.0], (name, out)
assert out["mean"] == list(array("f", [96 / 7, -96 / 7])), out
for name, pre in PRE_AGGREGATORS.items():
    new = pre(ups, f=1, **({"seed": 1} if name == "bucketing" else {}))
    assert all(type(v) is array for v in new)
assert "numpy" not in [m for m in sys.modules if sys.modules[m] is not None]
print("ok")
"""


def test_every_rule_runs_without_numpy_as_in_pyodide() -> None:
    proc = subprocess.run([sys.executable, "-c", BROWSER], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok", proc.stderr
