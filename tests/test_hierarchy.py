"""shared.hierarchy: grouping, election, a group's reduction at two aggregators, the server's
check of their results and the combination of group results."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from shared.hierarchy import (
    GroupReducer,
    Member,
    accused,
    combine,
    decode_missing,
    elect,
    encode_missing,
    make_groups,
    next_aggregator,
    parse_plan,
    plan_dict,
    reduce_group,
    region_of,
)
from shared.messages import sha256_hex
from shared.p2p import ShardCheck, decode_result, revise
from shared.vec import to_bytes


def ids(n: int) -> list[str]:
    return [f"{i:064x}" for i in range(1, n + 1)]


def test_groups_follow_regions_and_are_deterministic() -> None:
    members = [Member(node_id=n, region="eu" if i % 2 else "us") for i, n in enumerate(ids(12))]
    groups = make_groups(members, n_groups=4)
    assert make_groups(list(reversed(members)), n_groups=4) == groups  # order does not matter
    assert [len(g) for g in groups] == [3, 3, 3, 3]
    assert [{m.region for m in g} for g in groups] == [{"eu"}, {"eu"}, {"us"}, {"us"}]
    assert sorted(m.node_id for g in groups for m in g) == ids(12)


def test_groups_shrink_until_each_has_two_capable_members() -> None:
    # 9 members, only 3 native: three groups would leave some without two aggregators
    members = [Member(node_id=n, capable=i in (0, 1, 8)) for i, n in enumerate(ids(9))]
    groups = make_groups(members, n_groups=3)
    assert len(groups) == 1
    assert make_groups(members[2:8], n_groups=2) == []  # no capable member at all
    assert len(make_groups([Member(node_id=n) for n in ids(7)], n_groups=5)) == 2  # >= 3 each
    with pytest.raises(ValueError, match="distinct"):
        make_groups([Member(node_id="a"), Member(node_id="a")], n_groups=1)


def test_region_label_from_hello_features() -> None:
    assert region_of(frozenset({"delta-params", "region=eu-west"})) == "eu-west"
    assert region_of(frozenset({"delta-params"})) == ""


def test_election_rotates_by_round_skips_tabs_and_puts_liars_last() -> None:
    group = [Member(node_id=n, capable=n != ids(4)[3]) for n in ids(4)]  # the 4th is a tab
    a, b, c, tab = ids(4)
    assert elect(0, 10, group).owners[0] == (a, b)
    assert elect(1, 10, group).owners[0] == (b, c)
    assert elect(2, 10, group).owners[0] == (c, a)
    assert all(tab not in elect(r, 10, group).owners[0] for r in range(6))
    assert elect(0, 10, group, avoid=[a]).owners[0] == (b, c)
    plan = elect(0, 10, group)
    assert next_aggregator(plan, [a, b, c]) == c
    assert next_aggregator(plan, [a, b]) is None


def _group(n: int, rule: str = "median") -> tuple[list[str], list[np.ndarray], dict[str, str],
                                                  list[GroupReducer]]:
    rng = np.random.default_rng(0)
    members = ids(n)
    updates = [rng.normal(size=50).astype(np.float32) for _ in members]
    digests = {m: sha256_hex(to_bytes(u)) for m, u in zip(members, updates, strict=True)}
    plan = elect(3, 50, [Member(node_id=m) for m in members])
    d = plan_dict(plan, group=1, n_groups=2, digests=digests)
    plan2, group, digests2 = parse_plan(d)
    assert (plan2, group, digests2) == (plan, 1, digests)
    nodes = [GroupReducer(m, plan, digests, u, rule=rule, result_codec="fp16")
             for m, u in zip(members, updates, strict=True)]
    return members, updates, digests, nodes


def _deliver(nodes: list[GroupReducer], events: list[dict[str, Any]], sender: str
             ) -> list[dict[str, Any]]:
    by_id = {r.me: r for r in nodes}
    ups = []
    for e in events:
        if e["to"] == "server":
            ups.append({**e, "from": sender})
        else:
            ups += _deliver(nodes, by_id[e["to"]].on_part(sender, e["payload"]), e["to"])
    return ups


def test_two_aggregators_reduce_the_group_to_identical_bytes() -> None:
    _members, updates, _, nodes = _group(5)
    ups = []
    for r in nodes:
        ups += _deliver(nodes, r.start(), r.me)
    aggs = [r for r in nodes if r.aggregating]
    assert len(aggs) == 2
    assert len(ups) == 2
    assert {u["from"] for u in ups} == {a.me for a in aggs}
    assert ups[0]["payload"] == ups[1]["payload"]  # honest aggregators agree bit for bit
    want = reduce_group("median", updates, byzantine_fraction=0.0)
    got = decode_result(ups[0]["payload"], 50, "fp16")
    assert np.allclose(got, want, atol=2e-3)
    # members who do not aggregate sent their update twice, and nothing else
    plain = [r for r in nodes if not r.aggregating]
    assert all(r.bytes_out == 2 * 200 for r in plain)


def test_an_aggregator_refuses_parts_that_do_not_match_the_ready_digest() -> None:
    members, updates, _, nodes = _group(4)
    agg = next(r for r in nodes if r.aggregating)
    other = next(m for m in members if m != agg.me)
    forged = to_bytes(np.zeros(50, dtype=np.float32))
    with pytest.raises(ValueError, match="Ready digest"):
        agg.on_part(other, forged)
    with pytest.raises(ValueError, match="not a member"):
        agg.on_part("f" * 64, forged)
    with pytest.raises(ValueError, match="bytes"):
        agg.on_part(other, forged[:-4])
    plain = next(r for r in nodes if not r.aggregating)
    with pytest.raises(ValueError, match="does not aggregate"):
        plain.on_part(other, to_bytes(updates[members.index(other)]))


def test_the_combined_aggregate_goes_down_through_the_aggregators() -> None:
    _members, _, _, nodes = _group(5)
    aggs = [r for r in nodes if r.aggregating]
    payload = aggs[0].result or b""
    glob = np.linspace(-1, 1, 50).astype(np.float32)
    from shared.p2p import encode_result

    enc = encode_result(glob, "fp16")
    out = aggs[0].on_global(enc)
    assert sorted(e["to"] for e in out) == sorted(r.me for r in nodes if not r.aggregating)
    assert aggs[0].on_global(enc) == []  # forwarded once
    plain = next(r for r in nodes if not r.aggregating)
    with pytest.raises(ValueError, match="not an aggregator"):
        plain.on_forward(plain.me, enc)
    plain.on_forward(aggs[1].me, enc)
    agg = plain.aggregate()
    assert agg is not None
    assert np.allclose(agg, glob, atol=1e-3)
    assert payload == b""  # nothing was reduced: no parts were delivered


def test_a_lying_aggregator_is_outvoted_by_a_third() -> None:
    members, _updates, _digests, nodes = _group(5)
    plan = nodes[0].plan
    check = ShardCheck(plan, result_codec="fp16")
    ups = []
    for r in nodes:
        ups += _deliver(nodes, r.start(), r.me)
    honest, liar = ups[0], ups[1]
    forged = bytearray(liar["payload"])
    forged[-1] ^= 1  # a valid fp16 payload with one value changed
    assert check.on_result(honest["from"], 0, honest["payload"]) == []
    events = check.on_result(liar["from"], 0, bytes(forged))
    assert [e["kind"] for e in events] == ["extra_owner"]
    third = next_aggregator(plan, members)
    assert third is not None
    plan2 = revise(plan, extra={0: third})
    check.revise(plan2)
    node3 = next(r for r in nodes if r.me == third)
    ups3 = _deliver(nodes, node3.revise(plan2), third)
    for r in nodes:  # members send their update to the new aggregator
        if r.me != third:
            ups3 += _deliver(nodes, r.revise(plan2), r.me)
    mine = [u for u in ups3 if u["from"] == third]
    assert len(mine) == 1
    assert mine[0]["payload"] == honest["payload"]
    events = check.on_result(third, 0, mine[0]["payload"])
    assert {"kind": "liar", "node": liar["from"], "shard": 0} in events
    assert check.done
    assert check.liars == {liar["from"]: [0]}


def test_a_vanished_aggregator_is_replaced_and_a_gone_member_left_out() -> None:
    members, updates, _digests, nodes = _group(6, rule="mean")
    plan = nodes[0].plan
    gone_agg = plan.owners[0][0]
    plan2 = revise(plan, gone=[gone_agg])
    assert gone_agg not in plan2.members
    assert len(plan2.owners[0]) == 2
    live = [r for r in nodes if r.me != gone_agg]
    ups = []
    for r in live:
        ups += _deliver(live, r.revise(plan2), r.me)
    assert len(ups) == 2
    assert ups[0]["payload"] == ups[1]["payload"]
    kept = [u for m, u in zip(members, updates, strict=True) if m != gone_agg]
    got = decode_result(ups[0]["payload"], 50, "fp16")
    assert np.allclose(got, np.mean(kept, axis=0), atol=2e-3)


def test_combine_mean_weighs_groups_by_size_and_robust_rules_by_group() -> None:
    rng = np.random.default_rng(1)
    ups = [rng.normal(size=20).astype(np.float32) for _ in range(7)]
    g1, g2 = ups[:3], ups[3:]
    res = combine([np.mean(g1, axis=0), np.mean(g2, axis=0)], [3, 4], rule="mean",
                  byzantine_fraction=0.0)
    assert np.allclose(res, np.mean(ups, axis=0), atol=1e-6)  # = the flat mean
    bad = np.full(20, 1e6, dtype=np.float32)
    res = combine([np.zeros(20, np.float32), np.ones(20, np.float32), bad], [3, 3, 3],
                  rule="median", byzantine_fraction=0.34)
    assert np.allclose(res, 1.0)  # one poisoned group result cannot move the median far
    with pytest.raises(ValueError, match="one size per group"):
        combine([], [], rule="mean", byzantine_fraction=0.0)


def test_missing_update_reports_drop_only_what_every_other_aggregator_lacks() -> None:
    a, b, c, d = ids(4)
    assert decode_missing(encode_missing([a, c]), [a, b, c, d]) == {a, c}
    with pytest.raises(ValueError, match="outside the group"):
        decode_missing(encode_missing(["e" * 64]), [a, b])
    with pytest.raises(ValueError, match="64-character"):
        decode_missing(b"abcd", [a, b])
    assert accused((a, b), {b: {a}}) == {a}  # a hung aggregator: the other lacks its update
    assert accused((a, b), {a: {c}}) == set()  # b holds c's update (it did not report it)
    assert accused((a, b), {a: {c}, b: {c}}) == {c}
    assert accused((a, b), {}) == set()
    _, _, _, nodes = _group(4)
    agg = next(r for r in nodes if r.aggregating)
    assert agg.missing() == [m for m in agg.plan.members if m != agg.me]
    assert next(r for r in nodes if not r.aggregating).missing() == []


def test_run_config_takes_p2p_groups_with_p2p_only() -> None:
    from server.config import RunConfig
    from server.reduction import choose_reduction  # noqa: F401 - the hook imports cleanly

    cfg = RunConfig.from_dict({"transport": "p2p", "p2p_groups": 4, "aggregator": "median"})
    assert cfg.p2p_groups == 4
    with pytest.raises(ValueError, match="p2p_groups needs transport p2p"):
        RunConfig.from_dict({"transport": "ws", "p2p_groups": 2})
    with pytest.raises(ValueError, match="p2p_groups must be >= 0"):
        RunConfig.from_dict({"transport": "p2p", "p2p_groups": -1, "aggregator": "median"})
