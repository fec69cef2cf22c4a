"""Secure aggregation in `p2p` runs: shard owners sum masked slices, the server unmasks the sum.

- in memory (shared.secagg.p2p with the real participants and aggregator): the owners' ring
  sums, joined, unmask to the exact fixed-point sum, also with a member gone after sending its
  slices; owners only ever hold masked slices; a slice or result of the wrong length is a
  typed error and is not counted;
- end to end (tests/secagg_p2p_scenario.py, a private network namespace): a real server with
  `--transport p2p --secagg` and 4 real native nodes; the committed sum is the plain
  fixed-point sum of what the nodes trained, and with a node killed after sending its masked
  slices the round still commits the exact sum of the rest.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.netns import available
from server.config import RunConfig
from shared.envelope import Identity
from shared.p2p import MalformedResult, make_plan
from shared.secagg import FixedPoint, RoundConfig
from shared.secagg.local import LocalRound
from shared.secagg.p2p import BadMaskedSlice, SecAggShardCheck, SecAggShardReducer
from shared.secagg.prg import ring_from_bytes
from tests.conftest import in_netns

N_PARAMS = 103


def masked_round(count: int, seed: int = 5) -> tuple[LocalRound, dict[str, bytes],
                                                     dict[str, bytes]]:
    """A keyed round of `count` participants; node -> masked words, node -> plain words."""
    cfg = RoundConfig(run_id="r", round=0, seed=secrets.token_bytes(32), dimension=N_PARAMS,
                      fixed_point=FixedPoint.for_sum(0.5, count))
    lr = LocalRound(cfg, [Identity.generate() for _ in range(count)])
    lr.setup()
    rng = np.random.default_rng(seed)
    masked, plain = {}, {}
    for n, p in lr.participants.items():
        y = cfg.fixed_point.encode(rng.uniform(-0.4, 0.4, N_PARAMS).astype(np.float32))
        plain[n] = y.astype("<u4").tobytes()
        masked[n] = p.mask(y).payload
    return lr, masked, plain


def reduce_p2p(masked: dict[str, bytes], gone: set[str] = frozenset()  # type: ignore[assignment]
               ) -> tuple[SecAggShardCheck, dict[str, list[bytes]]]:
    """Every member sends its slices; the `gone` ones are then dropped from the plan (as the
    server's revise does) and the owners reduce over the rest. Returns the server's check and
    what each owner received."""
    from shared.p2p import revise

    plan = make_plan(0, masked, N_PARAMS, replicas=2)
    reducers = {n: SecAggShardReducer(n, plan, masked[n]) for n in plan.members}
    seen: dict[str, list[bytes]] = {n: [] for n in plan.members}
    results: list[tuple[str, dict[str, Any]]] = []

    def route(sender: str, events: list[dict[str, Any]]) -> None:
        for e in events:
            if e["to"] == "server":
                results.append((sender, e))
            elif e["to"] in reducers:
                seen[e["to"]].append(e["payload"])
                route(e["to"], reducers[e["to"]].on_part(sender, e["shard"], e["payload"]))

    for n in plan.members:
        route(n, reducers[n].start())
    if gone:
        plan = revise(plan, gone=gone)
        results.clear()
        for g in gone:
            del reducers[g]
        pending = {n: reducers[n].revise(plan) for n in plan.members}  # all adopt it first
        for n, events in pending.items():
            route(n, events)
    check = SecAggShardCheck(plan)
    for owner, e in results:
        check.on_result(owner, e["shard"], e["payload"])
    return check, seen


def plain_sum(plain: dict[str, bytes], nodes: list[str]) -> bytes:
    acc = np.zeros(N_PARAMS, dtype=np.uint32)
    for n in nodes:
        acc += np.frombuffer(plain[n], dtype="<u4")
    return acc.astype("<u4").tobytes()


@pytest.mark.parametrize("drop", [False, True])
def test_owners_sum_masked_shards_and_the_server_unmasks_the_exact_sum(drop: bool) -> None:
    lr, masked, plain = masked_round(4)
    gone = {sorted(masked)[1]} if drop else set()
    check, seen = reduce_p2p(masked, gone)
    assert check.done
    agg = lr.aggregator
    assert agg is not None
    agg.sum = ring_from_bytes(check.ring())
    agg.submitted = list(check.plan.members)
    res = lr.unmask([n for n in check.plan.members])
    assert len(res.contributors) == 4 - len(gone)
    assert np.asarray(res.ring_sum).astype("<u4").tobytes() == plain_sum(
        plain, list(res.contributors))
    # owners saw masked slices only: no received slice is a slice of anyone's plain words
    plains = [p for p in plain.values()]
    for got in seen.values():
        assert got
        for s in got:
            assert not any(s in p for p in plains)


def test_a_slice_or_result_of_the_wrong_length_is_refused_and_not_counted() -> None:
    _, masked, _ = masked_round(3)
    plan = make_plan(0, masked, N_PARAMS, replicas=2)
    a, b = plan.owners[0][0], plan.members[-1]
    r = SecAggShardReducer(a, plan, masked[a])
    lo, hi = plan.bounds(0)
    with pytest.raises(BadMaskedSlice) as err:
        r.on_part(b, 0, masked[b][4 * lo:4 * hi] + b"\0\0\0\0")  # a 64-bit ring's worth, say
    assert err.value.code == "secagg_bad_masked_update"
    assert b not in r.parts.get(0, {})
    with pytest.raises(BadMaskedSlice):
        SecAggShardReducer(a, plan, masked[a][:-4])
    check = SecAggShardCheck(plan)
    with pytest.raises(MalformedResult):
        check.on_result(a, 0, b"\0" * (4 * (hi - lo) - 4))
    assert 0 not in check.agreed


def test_config_takes_secagg_with_p2p_but_not_with_groups() -> None:
    assert RunConfig(transport="p2p", secagg=True).secagg
    with pytest.raises(ValueError, match="p2p_groups"):
        RunConfig(transport="p2p", secagg=True, p2p_groups=2)


netns = pytest.mark.skipif(available() is not None,
                           reason=f"no private network namespace: {available()}")


def node_id(log: str) -> str:
    return log.split("node id ", 1)[1].split()[0]


def check_sum(res: dict[str, Any], tmp: Path, nodes: int, round_: int) -> list[str]:
    """The server's unmasked sum of the run's last round is the plain sum of its
    contributors' words."""
    ids = {node_id(res["node_logs"][i]): i for i in range(nodes)}
    last = res["run"]["secagg"]["last"]
    assert last["round"] == round_
    acc = np.zeros(9610, dtype=np.uint32)  # mlp-digits
    for n in last["contributors"]:
        acc += np.frombuffer((tmp / f"n{ids[n]}" / f"secagg-plain-{round_}.u32").read_bytes(),
                             dtype="<u4")
    assert last["sum_sha256"] == hashlib.sha256(acc.astype("<u4").tobytes()).hexdigest()
    return list(last["contributors"])


@netns
def test_four_native_nodes_commit_the_exact_sum(tmp_path: Path) -> None:
    res = in_netns("tests.secagg_p2p_scenario", [str(tmp_path), "4", "none"], timeout=280)
    assert [r["n_updates"] for r in res["rounds"]] == [4]
    assert len(check_sum(res, tmp_path, 4, 0)) == 4
    assert "secure aggregation keyed among 4 of 4" in res["server_log"]
    assert res["run"]["secagg"]["stage"] == "idle"


@netns
def test_a_node_killed_after_sending_its_masked_slices_still_gives_the_exact_sum(
        tmp_path: Path) -> None:
    res = in_netns("tests.secagg_p2p_scenario", [str(tmp_path), "4", "drop"], timeout=280)
    assert "SECAGG-P2P dropped after its slices" in res["node_logs"][0]
    assert (tmp_path / "n0" / "secagg-plain-1.u32").exists()  # it trained and masked
    assert len(res["rounds"]) == 2
    assert "round 1: secure aggregation keyed among 4 of 4" in res["server_log"]
    contributors = check_sum(res, tmp_path, 4, 1)
    assert node_id(res["node_logs"][0]) not in contributors  # dropped: its masks came off
    assert len(contributors) == 3


@netns
def test_a_member_sending_bad_masked_slices_is_excluded_and_the_rest_is_exact(
        tmp_path: Path) -> None:
    res = in_netns("tests.secagg_p2p_scenario", [str(tmp_path), "4", "badslice"], timeout=280)
    bad = node_id(res["node_logs"][0])
    assert "round 1: secure aggregation keyed among 4 of 4" in res["server_log"]
    assert "secagg_bad_masked_update" in res["server_log"]
    assert res["run"]["secagg"]["last"]["excluded"].get(bad) == "secagg_bad_masked_update"
    contributors = check_sum(res, tmp_path, 4, 1)
    assert bad not in contributors
    assert len(contributors) == 3


def test_an_owners_accusation_needs_the_members_signed_slice_of_the_wrong_length() -> None:
    from shared.errors import MessageError
    from shared.messages import Shard
    from shared.secagg.p2p import check_accusation

    ids = [Identity.generate() for _ in range(3)]
    plan = make_plan(0, [i.node_id for i in ids], N_PARAMS, replicas=2)
    by_id = {i.node_id: i for i in ids}
    owner = plan.owners[0][0]
    member = next(m for m in plan.members if m != owner)
    lo, hi = plan.bounds(0)

    def signed(who: str, payload: bytes, to: str = owner) -> bytes:
        msg = Shard(run_id="r", round=0, node_id=who, to=to, kind="part", shard=0,
                    revision=0, payload=payload)
        return msg.to_frame(sign=by_id[who].signer(run_id="r", round_=0, msg_type=Shard.TYPE,
                                                   nonce=msg.nonce))

    key = by_id[member].public_key
    bad = signed(member, b"\0" * (4 * (hi - lo) + 4))
    assert check_accusation(bad, run_id="r", round_=0, accuser=owner, plan=plan,
                            signing_key=key) == member
    good = signed(member, b"\0" * (4 * (hi - lo)))
    with pytest.raises(MessageError, match="well formed"):
        check_accusation(good, run_id="r", round_=0, accuser=owner, plan=plan,
                         signing_key=key)
    with pytest.raises(MessageError):  # signed by someone else than the accused
        check_accusation(bad, run_id="r", round_=0, accuser=owner, plan=plan,
                         signing_key=by_id[owner].public_key)
    other = next(m for m in plan.members if m not in (owner, member))
    with pytest.raises(MessageError, match="not one this owner took"):  # sent to another
        check_accusation(signed(member, b"\0" * 8, to=other), run_id="r", round_=0,
                         accuser=owner, plan=plan, signing_key=key)


def test_tabs_and_native_nodes_are_admitted_to_a_secure_p2p_run(
        tmp_path: Path) -> None:
    from server.coordinator import Coordinator
    from server.runstate import open_run
    from server.secagg_p2p import SecAggP2PReduction
    from shared.messages import Hello

    coord = Coordinator(open_run(tmp_path / "run", {"model": "mlp-digits", "transport": "p2p",
                                                    "secagg": True}))
    red = coord.reduction
    assert isinstance(red, SecAggP2PReduction)
    assert coord.secagg is red  # wired as the star run's key stages are
    ident = Identity.generate()

    def hello(runtime: str) -> Hello:
        return Hello(node_id=ident.node_id, public_key=ident.public_key.hex(),
                     challenge="00" * 32, runtime=runtime, agent="t", device="cpu")

    assert red.on_join(hello("browser")) == "p2p"
    assert red.on_join(hello("native")) == "p2p"
