"""Secure and robust in a live run: the real coordinator (server.secagg_groups_round) and the one
participant implementation (shared.participant), over memory. Nine nodes in three groups, each
an independent secure-aggregation session; the committed aggregate is the median of the group
means, each recomputed here from what the group's nodes masked (the participant's own
fixed-point encoding, `Live.plain`): exact, with a node dropping after its masked update, and
with an attacker whose group mean the median outvotes."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.secagg_run import Live, live_run, until
from server.config import RunConfig
from server.coordinator import Coordinator
from server.secagg_groups_round import SecAggGroupsReduction
from shared.outer import OuterConfig, outer_step
from shared.secagg import groups as G

Start = tuple[np.ndarray, np.ndarray]


@contextlib.asynccontextmanager
async def grouped_run(tmp_path: Path, nodes: int, **config: Any
                      ) -> AsyncIterator[tuple[Coordinator, list[Live], Start]]:
    async with live_run(tmp_path / "run", nodes, **{
            "secagg": True, "secagg_clip": 0.5, "secagg_timeout_s": 5.0,
            "secagg_groups": 3, "aggregator": "median", **config}) as (coord, lives):
        start = (np.asarray(coord.run.params).copy(), np.asarray(coord.run.momentum).copy())
        await until(lambda: coord.status()["secagg"]["stage"] == "masking", "every group keyed")
        yield coord, lives, start


def deltas(n: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.3, 0.3, n).astype(np.float32) for _ in range(count)]


def group_means(coord: Coordinator, lives: list[Live]) -> list[np.ndarray]:
    """Each unmasked group's mean from the fixed-point vectors its contributors masked
    (checked against the sum the server unmasked), in group order; the groups left out of
    the combination are skipped."""
    plain = {lv.part.node_id: lv.plain[0] for lv in lives if 0 in lv.plain}
    last = coord.status()["secagg"]["last"]
    means = []
    for g in last["groups"]:
        if g["index"] in last["left_out"]:
            assert g["status"] != "ok"
            continue
        assert g["status"] == "ok"
        ring = np.zeros(coord.run.n_params, dtype=np.uint32)
        for node in g["contributors"]:
            ring += np.frombuffer(plain[node], dtype="<u4")
        assert g["sum_sha256"] == hashlib.sha256(ring.astype("<u4").tobytes()).hexdigest()
        means.append((ring.view(np.int32).astype(np.float64) / 2 ** g["frac_bits"]
                      / len(g["contributors"])).astype(np.float32))
    return means


def committed(coord: Coordinator, start: Start, aggregate: np.ndarray) -> bool:
    cfg = coord.config
    want, _ = outer_step(start[0], aggregate, start[1],
                         OuterConfig(lr=cfg.outer_lr, momentum=cfg.outer_momentum))
    return bool(np.array_equal(np.asarray(coord.run.params), np.asarray(want)))


def check_groups(coord: Coordinator, lives: list[Live]) -> list[dict[str, Any]]:
    """Three disjoint groups of three covering every node, as groups.assign draws them from
    the round's published seed (nobody picked its group)."""
    last = coord.status()["secagg"]["last"]
    ids = sorted(lv.part.node_id for lv in lives)
    drawn = G.assign(bytes.fromhex(last["seed"]), ids, 3)
    assert [tuple(g["members"]) for g in last["groups"]] == list(drawn)
    assert sorted(n for g in drawn for n in g) == ids
    return list(last["groups"])


async def test_the_commit_is_the_median_of_the_exact_group_means(tmp_path: Path) -> None:
    async with grouped_run(tmp_path, 9, quorum=9) as (coord, lives, start):
        for lv, d in zip(lives, deltas(coord.run.n_params, 9, seed=3), strict=True):
            await lv.train(d)
        await until(lambda: coord.run.version == 1, "the commit")
        check_groups(coord, lives)
        means = group_means(coord, lives)
        median = np.median(np.stack(means), axis=0).astype(np.float32)
        assert committed(coord, start, median)
        mean = np.mean(np.stack(means).astype(np.float64), axis=0).astype(np.float32)
        assert not committed(coord, start, mean)  # the rule is applied, not the plain mean
        last = coord.status()["secagg"]["last"]
        assert last["combined"] == [0, 1, 2]
        assert last["left_out"] == []
        assert coord.counters["secagg_group_rounds"] == 1
        assert coord.counters["secagg_rounds"] == 3  # one secure-aggregation session a group
        assert all(lv.errors == [] for lv in lives)


async def test_a_node_dropping_after_its_masked_update_still_counts_in_its_group(
        tmp_path: Path) -> None:
    async with grouped_run(tmp_path, 9, quorum=8) as (coord, lives, start):
        ds = deltas(coord.run.n_params, 9, seed=5)
        await lives[0].train(ds[0])
        await until(lambda: len(coord.state.updates) == 1 if coord.state else False, "accept")
        lives[0].leave()  # gone before the unmask request
        for lv, d in zip(lives[1:], ds[1:], strict=True):
            await lv.train(d)
        await until(lambda: coord.run.version == 1, "the commit")
        gone = lives[0].part.node_id
        group = next(g for g in check_groups(coord, lives) if gone in g["members"])
        assert gone in group["contributors"]
        assert gone not in group["responders"]
        means = group_means(coord, lives)
        assert committed(coord, start, np.median(np.stack(means), axis=0).astype(np.float32))
        assert coord.counters["secagg_dropped_after_submit"] == 1


async def test_an_attackers_group_mean_is_outvoted_by_the_median(tmp_path: Path) -> None:
    async with grouped_run(tmp_path, 9, quorum=9) as (coord, lives, start):
        ds = [d / 6 for d in deltas(coord.run.n_params, 9, seed=7)]  # honest: |d| <= 0.05
        ds[4] = np.full(coord.run.n_params, 100.0, dtype=np.float32)  # huge (clipped to 0.5)
        for lv, d in zip(lives, ds, strict=True):
            await lv.train(d)
        await until(lambda: coord.run.version == 1, "the commit")
        bad = lives[4].part.node_id
        groups = check_groups(coord, lives)
        means = group_means(coord, lives)
        spoiled = next(i for i, g in enumerate(groups) if bad in g["members"])
        honest = np.stack([m for i, m in enumerate(means) if i != spoiled])
        median = np.median(np.stack(means), axis=0).astype(np.float32)
        assert committed(coord, start, median)
        # the spoiled group pulls every coordinate up; the median stays within the honest
        # groups' means, where the plain mean of all nine updates does not
        assert np.all(means[spoiled] > honest.max(axis=0))
        assert np.all(median >= honest.min(axis=0))
        assert np.all(median <= honest.max(axis=0))
        plain = np.mean(np.stack(means).astype(np.float64), axis=0)
        assert np.all(plain > honest.max(axis=0))


async def test_a_group_that_cannot_unmask_is_left_out_and_the_rest_commit(
        tmp_path: Path) -> None:
    """Two of a group's three members drop after their masked updates: that group's sum
    cannot be unmasked; two of three groups are more than half, so the round commits the
    rule over those two group means, each exact."""
    async with grouped_run(tmp_path, 9, quorum=7) as (coord, lives, start):
        red = coord.secagg
        assert isinstance(red, SecAggGroupsReduction)
        doomed = set(red.sessions[1].members[:2])
        first = [lv for lv in lives if lv.part.node_id in doomed]
        ds = deltas(coord.run.n_params, 9, seed=13)
        for lv, d in zip(first, ds, strict=False):
            await lv.train(d)
        await until(lambda: all(lv.acks for lv in first), "the droppers' updates")
        for lv in first:
            lv.leave()
        for lv, d in zip([lv for lv in lives if lv not in first], ds[2:], strict=True):
            await lv.train(d)
        await until(lambda: coord.run.version == 1, "the commit", timeout=60)
        last = coord.status()["secagg"]["last"]
        assert last["left_out"] == [1]
        assert last["groups"][1]["status"] == "unmask failed"
        assert last["combined"] == [0, 2]
        assert coord.counters["secagg_group_failed"] == 1
        means = group_means(coord, lives)
        two = G.combine([G.GroupSum(index=i, total=m, count=1) for i, m in enumerate(means)],
                        rule="median", f=1)
        assert committed(coord, start, np.asarray(two, dtype=np.float32))
        assert np.array_equal(np.asarray(two), ((means[0].astype(np.float64) + means[1])
                                                / 2).astype(np.float32))


async def test_half_the_groups_failing_retries_the_round_with_fresh_groups(
        tmp_path: Path) -> None:
    """Six nodes in two groups; two of one group's members drop after submitting: one of two
    groups unmasked is not more than half, so nothing is committed; the round is re-drawn
    among the four left (one group: a group keeps >= 3), who mask their held updates again,
    and it commits their exact mean."""
    async with grouped_run(tmp_path, 6, quorum=4, secagg_groups=2) as (coord, lives, start):
        red = coord.secagg
        assert isinstance(red, SecAggGroupsReduction)
        doomed = set(red.sessions[0].members[:2])
        first = [lv for lv in lives if lv.part.node_id in doomed]
        rest = [lv for lv in lives if lv not in first]
        ds = deltas(coord.run.n_params, 6, seed=19)
        for lv, d in zip(first, ds, strict=False):
            await lv.train(d)
        await until(lambda: all(lv.acks for lv in first), "the droppers' updates")
        for lv in first:
            lv.leave()
        for lv, d in zip(rest, ds[2:], strict=True):
            await lv.train(d)
        await until(lambda: coord.run.version == 1, "the commit after the retry", timeout=60)
        assert coord.counters["secagg_groups_retried"] == 1
        assert coord.counters["secagg_groups_capped"] == 1
        last = coord.status()["secagg"]["last"]
        assert len(last["groups"]) == 1
        assert sorted(last["groups"][0]["contributors"]) == sorted(lv.part.node_id
                                                                   for lv in rest)
        (mean,) = group_means(coord, rest)
        assert committed(coord, start, mean)
        json.dumps(coord.status()["secagg"])  # /api/run carries it


async def test_validation_at_group_level_drops_the_spoiled_group_mean(tmp_path: Path) -> None:
    async with grouped_run(tmp_path, 9, quorum=9, validation=True) as (coord, lives, start):
        ds = [d / 6 for d in deltas(coord.run.n_params, 9, seed=17)]
        ds[2] = np.full(coord.run.n_params, -100.0, dtype=np.float32)  # clipped to -0.5
        for lv, d in zip(lives, ds, strict=True):
            await lv.train(d)
        await until(lambda: coord.run.version == 1, "the commit")
        bad = lives[2].part.node_id
        groups = check_groups(coord, lives)
        spoiled = next(i for i, g in enumerate(groups) if bad in g["members"])
        last = coord.status()["secagg"]["last"]
        assert last["groups"][spoiled]["status"] == "rejected by validation"
        kept = [i for i in range(3) if i != spoiled]
        assert last["combined"] == kept
        assert all(last["groups"][i]["status"] == "ok" for i in kept)
        assert coord.counters["secagg_group_rejected"] == 1
        means = group_means(coord, lives)
        two = (means[0].astype(np.float64) + means[1]) / 2  # the median of the two kept
        assert committed(coord, start, two.astype(np.float32))


def test_the_config_allows_robust_rules_only_over_groups() -> None:
    RunConfig(secagg=True, secagg_groups=3, aggregator="median", quorum=6)
    RunConfig(secagg=True, secagg_groups=-1, aggregator="trimmed-mean", quorum=6,
              byzantine_fraction=0.2)
    RunConfig(secagg=True, secagg_groups=3, aggregator="median", validation=True)
    for bad in (dict(secagg=True, aggregator="median"),  # no groups: the server sees one sum
                dict(secagg=True, validation=True),
                dict(secagg_groups=3),  # groups without secagg
                dict(secagg=True, secagg_groups=3, aggregator="krum"),
                dict(secagg=True, secagg_groups=3, transport="p2p"),
                dict(secagg=True, secagg_groups=-2)):
        with pytest.raises(ValueError, match="config "):
            RunConfig(**bad)


def test_the_group_count_is_capped_so_groups_keep_three_members() -> None:
    red = SecAggGroupsReduction.__new__(SecAggGroupsReduction)
    red.config = RunConfig(secagg=True, secagg_groups=5, aggregator="median")
    assert [red.group_count(n) for n in (2, 5, 6, 9, 15, 40)] == [1, 1, 2, 3, 5, 5]
    red.config = RunConfig(secagg=True, secagg_groups=-1, byzantine_fraction=0.2,
                           aggregator="median")
    assert [red.group_count(n) for n in (9, 20, 40)] == [3, 6, 13]
