"""shared.secagg.groups: group count and assignment from the round seed, real secure
aggregation inside each group (ML-KEM-768, ML-DSA-65, masked fixed point), a robust rule over
the group means equal to the rule over the true group sums, dropouts inside a group, and
validation at group level."""

from __future__ import annotations

import hashlib
from array import array

import numpy as np
import pytest

from bench.secagg_robust import group_attack, secure_group_sums
from shared.aggregation import get_rule
from shared.envelope import Identity
from shared.secagg import FixedPoint
from shared.secagg.groups import (
    GroupSum,
    assign,
    combine,
    group_count,
    group_mean,
    group_seed,
    spoiled,
    tolerated,
    validate,
)

SEED = hashlib.sha256(b"round seed").digest()
DIM = 97


@pytest.fixture(scope="module")
def ids() -> dict[str, Identity]:
    return {i.node_id: i for i in (Identity.generate() for _ in range(10))}


def test_group_count_leaves_attackers_fewer_than_half_the_groups() -> None:
    assert group_count(30, 0.0) == 1  # no attacker assumed: one group, plain secure agg
    assert group_count(30, 0.1) == 7  # f = 3 -> 2f + 1
    assert tolerated(7) == 3
    assert group_count(15, 0.2) == 5  # f = 3 would want 7, but groups keep >= 3 members
    assert group_count(5, 0.2) == 1
    assert group_count(12, 0.25, min_size=2) == 6
    for bad in (-0.1, 0.5):
        with pytest.raises(ValueError, match="attacker_fraction"):
            group_count(10, bad)
    with pytest.raises(ValueError, match="participants"):
        group_count(0, 0.1)


def test_assignment_is_a_partition_fixed_by_the_seed() -> None:
    nodes = [f"{i:064x}" for i in range(23)]
    groups = assign(SEED, nodes, 5)
    assert sorted(n for g in groups for n in g) == sorted(nodes)
    assert sorted(len(g) for g in groups) == [4, 4, 5, 5, 5]
    assert assign(SEED, list(reversed(nodes)), 5) == groups  # roster order does not matter
    other = assign(hashlib.sha256(b"next round").digest(), nodes, 5)
    assert other != groups  # a new seed, new groups
    assert group_seed(SEED, 0) != group_seed(SEED, 1) != SEED
    with pytest.raises(ValueError, match="24 groups"):
        assign(SEED, nodes, 24)
    with pytest.raises(ValueError, match="duplicate"):
        assign(SEED, nodes + nodes[:1], 5)
    with pytest.raises(ValueError, match="32 bytes"):
        assign(b"short", nodes, 5)


def test_a_node_cannot_choose_its_group_by_its_place_in_the_roster() -> None:
    nodes = [f"{i:064x}" for i in range(12)]
    g1 = assign(SEED, nodes, 4)
    g2 = assign(SEED, nodes[6:] + nodes[:6], 4)
    assert g1 == g2
    assert spoiled(g1, [g1[0][0], g1[0][1]]) == 1
    assert spoiled(g1, [g1[0][0], g1[1][0], g1[2][0]]) == 3
    assert spoiled(g1, []) == 0


def _updates(nodes: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.uniform(-0.5, 0.5, DIM).astype(np.float32) for n in nodes}


def _true_sum(fp: FixedPoint, xs: list[np.ndarray]) -> np.ndarray:
    acc = np.zeros(DIM, np.uint32)
    for x in xs:
        acc += np.asarray(fp.encode(x), np.uint32)
    return acc.view(np.int32).astype(np.float64) / fp.scale


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "centered-clipping", "mean"])
def test_robust_rule_over_secure_group_sums_equals_rule_over_true_sums(
        ids: dict[str, Identity], rule: str) -> None:
    nodes = sorted(ids)[:9]
    groups = assign(SEED, nodes, 3)
    xs = _updates(nodes)
    fp = FixedPoint.for_sum(1.0, 3)
    sums, wrong = secure_group_sums(groups, xs, ids, run_id="t", round_=0, seed=SEED, fp=fp)
    assert wrong == 0
    assert [s.index for s in sums] == [0, 1, 2]
    for s, g in zip(sums, groups, strict=True):
        assert s.count == 3
        assert np.array_equal(np.asarray(s.total), _true_sum(fp, [xs[n] for n in g]))
    got = np.asarray(combine(sums, rule=rule, f=1))
    means = [(_true_sum(fp, [xs[n] for n in g]) / 3).astype(np.float32) for g in groups]
    want = np.asarray(get_rule(rule)(means, f=1 if rule != "mean" else 0))
    assert np.array_equal(got, want)


def test_dropouts_inside_a_group(ids: dict[str, Identity]) -> None:
    nodes = sorted(ids)[:8]
    groups = assign(SEED, nodes, 2)  # 4 + 4: complete graph k = 3, threshold 2
    xs = _updates(nodes, seed=1)
    fp = FixedPoint.for_sum(1.0, 4)
    after, before = groups[0][0], groups[1][1]
    sums, wrong = secure_group_sums(groups, xs, ids, run_id="t", round_=1, seed=SEED, fp=fp,
                                    drop_after=[after], drop_before=[before])
    assert wrong == 0
    # dropped after sending its masked update: still in its group's sum
    assert sums[0].count == 4
    assert np.array_equal(np.asarray(sums[0].total), _true_sum(fp, [xs[n] for n in groups[0]]))
    # dropped before: the group's sum and mean are over the other three
    assert sums[1].count == 3
    rest = [xs[n] for n in groups[1] if n != before]
    assert np.array_equal(np.asarray(sums[1].total), _true_sum(fp, rest))
    # too many drop in one group: that group is left out, the rest still combines
    sums, wrong = secure_group_sums(groups, xs, ids, run_id="t", round_=2, seed=SEED, fp=fp,
                                    drop_after=list(groups[0][:3]))
    assert wrong == 0
    assert [s.index for s in sums] == [1]
    assert np.array_equal(np.asarray(combine(sums, rule="median", f=1)),
                          np.asarray(group_mean(sums[0])))


def test_a_spoiled_group_is_outvoted_while_attackers_hold_fewer_than_half(
        ids: dict[str, Identity]) -> None:
    nodes = sorted(ids)[:9]
    groups = assign(SEED, nodes, 3)
    honest = {n: np.full(DIM, 0.01, np.float32) for n in nodes}
    bad = {groups[2][0]}
    sent = {**honest, **group_attack("scaled", groups, bad, honest, honest, seed=0)}
    fp = FixedPoint.for_sum(1.0, 3)
    sums, _ = secure_group_sums(groups, sent, ids, run_id="t", round_=0, seed=SEED, fp=fp)
    spoilt = np.asarray(group_mean(sums[2]))
    assert np.allclose(spoilt, 0.1, atol=1e-6)  # the attacker set its group's mean: 10x
    assert np.allclose(np.asarray(combine(sums, rule="median", f=1)), 0.01, atol=1e-6)
    assert np.asarray(combine(sums, rule="mean", f=0)).mean() > 0.035
    # two of three groups spoiled: the median follows the attackers
    bad2 = {groups[1][0], groups[2][0]}
    sent = {**honest, **group_attack("scaled", groups, bad2, honest, honest, seed=0)}
    sums, _ = secure_group_sums(groups, sent, ids, run_id="t", round_=1, seed=SEED, fp=fp)
    assert np.allclose(np.asarray(combine(sums, rule="median", f=1)), 0.1, atol=1e-6)


def test_validation_at_group_level_and_combine_edges() -> None:
    keep = validate(1.0, [0.8, 0.82, 3.0, None, 0.79], threshold=0.1)
    assert keep == [True, True, False, False, True]
    sums = [GroupSum(index=i, total=np.full(4, float(v)), count=2)
            for i, v in enumerate([2, 4, 100])]
    got = np.asarray(combine(sums, rule="mean", f=0, keep=[True, True, False]))
    assert np.allclose(got, 1.5)
    with pytest.raises(ValueError, match="no group mean"):
        combine(sums, rule="median", f=1, keep=[False, False, False])
    # f larger than the rule supports for 3 means is clamped, not refused
    assert np.allclose(np.asarray(combine(sums, rule="trimmed-mean", f=5)), 2.0)
    with pytest.raises(ValueError, match="a sum of 0"):
        GroupSum(index=0, total=np.zeros(2), count=0)
    pure = GroupSum(index=0, total=array("d", [1.0, -3.0]), count=2)
    m = group_mean(pure)
    assert isinstance(m, array)
    assert m.typecode == "f"
    assert list(m) == [0.5, -1.5]
