"""Secure aggregation (shared/secagg): exact sums, dropouts, bad input, golden vectors, the
graph, and what the server sees. Real ML-KEM-768 and ML-DSA-65, small vectors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.envelope import Identity
from shared.secagg import (
    BadKeyMessage,
    BadMaskedUpdate,
    BadShare,
    FixedPoint,
    NotNeighbour,
    RoundConfig,
    SecAggError,
    SecAggParticipant,
    TooManyDropouts,
    choose_degree,
    neighbour_graph,
    shamir,
)
from shared.secagg.crypto import commit, derive, kem, open_sealed, seal
from shared.secagg.local import LocalRound
from shared.secagg.messages import KeyAdvert, MaskedUpdate, ShareBundle, UnmaskResponse
from shared.secagg.prg import BLOCK, DOMAIN, mask_bytes
from shared.secagg.stats import byte_uniformity_p

GOLDEN = json.loads((Path(__file__).resolve().parent.parent / "shared" / "testdata"
                     / "secagg.json").read_text())
DIM = 257


@pytest.fixture(scope="module")
def ids() -> list[Identity]:
    return [Identity.generate() for _ in range(9)]


def cfg(n: int, *, degree: int | None = None, dim: int = DIM, round_: int = 0) -> RoundConfig:
    return RoundConfig(run_id="run-sa", round=round_, seed=hashlib.sha256(b"seed").digest(),
                       dimension=dim, fixed_point=FixedPoint.for_sum(1.0, max(n, 2)),
                       degree=degree)


def updates(lr: LocalRound, *, pure: bool = False, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for n in lr.participants:
        x = rng.uniform(-1.3, 1.3, lr.cfg.dimension).astype(np.float32)
        out[n] = array("f", x.tolist()) if pure else x
    return out


def plain_sum(fp: FixedPoint, xs: list[Any]) -> np.ndarray:
    acc = np.zeros(len(xs[0]), dtype=np.uint32)
    for x in xs:
        acc += np.asarray(fp.encode(np.asarray(x, dtype=np.float32)), dtype=np.uint32)
    return acc


def run(lr: LocalRound, *, submit_skip: tuple[str, ...] = (), respond_skip: int = 0,
        pure: bool = False) -> tuple[Any, np.ndarray]:
    lr.setup()
    xs = updates(lr, pure=pure)
    sub = [n for n in lr.live if n not in submit_skip]
    for n in sub:
        lr.submit(n, lr.participants[n].masked_update(xs[n]))
    agg = lr.aggregator
    assert agg is not None
    res = lr.unmask(sorted(agg.submitted)[respond_skip:])
    want = plain_sum(lr.cfg.fixed_point, [xs[n] for n in res.contributors])
    return res, want


@pytest.mark.parametrize("pure", [False, True])
def test_the_unmasked_sum_is_the_exact_fixed_point_sum(ids: list[Identity], pure: bool) -> None:
    lr = LocalRound(cfg(5), ids[:5], use_numpy=not pure)
    res, want = run(lr, pure=pure)
    assert len(res.contributors) == 5
    assert res.excluded == {}
    assert np.array_equal(np.asarray(res.ring_sum, dtype=np.uint32), want)
    vals = np.asarray(res.values)
    assert np.abs(vals - want.view(np.int32) / 2 ** lr.cfg.fixed_point.frac_bits).max() == 0


def test_dropouts_after_submitting_recover_up_to_the_threshold_then_refuse(
        ids: list[Identity]) -> None:
    # 7 nodes, complete graph k = 6, t = 4: a survivor keeps 6 - m responding neighbours,
    # plus its own share of its seed (even k: shared.secagg.participant.own_share)
    lr = LocalRound(cfg(7), ids[:7])
    res, want = run(lr, respond_skip=3)
    assert np.array_equal(res.ring_sum, want)
    assert len(res.contributors) == 7  # the three dropped after submitting are in the sum
    lr = LocalRound(cfg(7), ids[:7])
    with pytest.raises(TooManyDropouts, match="cannot be unmasked"):
        run(lr, respond_skip=4)


def test_three_participants_survive_one_dropping_after_submitting(
        ids: list[Identity]) -> None:
    # k = 2, t = 2: each survivor's seed from its one responding neighbour and its own share
    lr = LocalRound(cfg(3), ids[:3])
    res, want = run(lr, respond_skip=1)
    assert np.array_equal(res.ring_sum, want)
    assert len(res.contributors) == 3
    lr = LocalRound(cfg(3), ids[:3])
    with pytest.raises(TooManyDropouts):
        run(lr, respond_skip=2)


def test_odd_degree_has_no_own_share(ids: list[Identity]) -> None:
    # k = 3, t = 2: an own share would let a lying server reach t with one honest neighbour
    lr = LocalRound(cfg(4), ids[:4])
    lr.setup()
    assert all(not p._own for p in lr.participants.values())
    assert lr.aggregator is not None
    assert all(not b.own_commit for b in lr.aggregator.bundles.values())


def test_dropouts_before_submitting_have_their_pair_masks_removed(ids: list[Identity]) -> None:
    # 6 nodes, complete graph k = 5, t = 3: two send keys and shares, then no update
    skip = tuple(sorted(i.node_id for i in ids[:6])[1:3])
    lr = LocalRound(cfg(6), ids[:6])
    res, want = run(lr, submit_skip=skip)
    assert set(res.contributors) == set(lr.participants) - set(skip)
    assert np.array_equal(res.ring_sum, want)
    assert lr.aggregator is not None
    assert lr.aggregator.unmask_request().dropped == skip


def test_masked_shards_sum_and_unmask_per_shard(ids: list[Identity]) -> None:
    lr = LocalRound(cfg(5), ids[:5])
    agg = lr.setup()
    halves = [agg.shard(0, 100), agg.shard(100, DIM)]
    xs = updates(lr)
    for n in lr.live[1:]:  # one drops before submitting
        y = lr.cfg.fixed_point.encode(xs[n])
        for h in halves:
            h.on_masked(lr.participants[n].mask(y[h.start:h.stop].copy(), offset=h.start))
    parts = []
    for h in halves:
        req = h.unmask_request()
        for n in h.submitted:
            h.on_unmask_response(lr.participants[n].on_unmask(req))  # same answer to both
        parts.append(h.finish().ring_sum)
    want = plain_sum(lr.cfg.fixed_point, [xs[n] for n in lr.live[1:]])
    assert np.array_equal(np.concatenate(parts), want)


@pytest.mark.parametrize("fault", ["length", "ring", "signature"])
def test_a_bad_masked_update_is_excluded_and_the_rest_unmask(ids: list[Identity],
                                                             fault: str) -> None:
    lr = LocalRound(cfg(6), ids[:6])
    bad = sorted(i.node_id for i in ids[:6])[2]

    def tamper(stage: str, msg: Any) -> Any:
        if stage != "masked" or msg.node_id != bad:
            return msg
        if fault == "length":
            return dataclasses.replace(msg, payload=msg.payload[:-4], length=msg.length - 1)
        if fault == "ring":
            return dataclasses.replace(msg, ring_bits=64)
        return dataclasses.replace(msg, payload=bytes(len(msg.payload)))

    lr.tamper = tamper
    res, want = run(lr)
    assert any(isinstance(e, BadMaskedUpdate) for e in lr.errors)
    assert res.excluded == {bad: "secagg_bad_masked_update"}
    assert bad not in res.contributors
    assert len(res.contributors) == 5
    assert np.array_equal(res.ring_sum, want)


def test_a_share_failing_its_commitment_is_detected_and_ignored(ids: list[Identity]) -> None:
    lr = LocalRound(cfg(6), ids[:6])
    liar = sorted(i.node_id for i in ids[:6])[0]
    by_id = {i.node_id: i for i in ids}

    def tamper(stage: str, msg: Any) -> Any:
        if stage == "unmask" and msg.node_id == liar:
            shares = tuple((d, (int(s, 16) ^ 1).to_bytes(66, "big").hex())
                           for d, s in msg.self_shares)
            return dataclasses.replace(msg, self_shares=shares).signed_by(by_id[liar])
        return msg

    lr.tamper = tamper
    res, want = run(lr)
    assert res.flagged == {liar: "secagg_bad_share"}
    assert np.array_equal(res.ring_sum, want)
    assert lr.aggregator is not None
    assert all(isinstance(e, BadShare) for e in lr.aggregator.bad_shares)
    assert lr.aggregator.bad_shares


def test_a_dealer_sealing_bad_shares_is_reported_by_the_holder(ids: list[Identity]) -> None:
    lr = LocalRound(cfg(5), ids[:5])
    dealer = sorted(i.node_id for i in ids[:5])[1]
    by_id = {i.node_id: i for i in ids}

    def tamper(stage: str, msg: Any) -> Any:
        if stage == "bundle" and msg.node_id == dealer:
            e = msg.entries[0]
            entries = ((e[0], e[1], "00" * 32, e[3]), *msg.entries[1:])
            return dataclasses.replace(msg, entries=entries).signed_by(by_id[dealer])
        return msg

    lr.tamper = tamper
    lr.setup()
    assert [type(e) for e in lr.errors] == [BadShare]


@pytest.mark.parametrize("stage", ["advert", "ciphertexts", "bundle"])
def test_a_key_message_with_a_bad_signature_excludes_its_sender(ids: list[Identity],
                                                                stage: str) -> None:
    lr = LocalRound(cfg(6), ids[:6])
    bad = sorted(i.node_id for i in ids[:6])[3]

    def tamper(st: str, msg: Any) -> Any:
        if st == stage and msg.node_id == bad:
            sig = bytearray(__import__("base64").b64decode(msg.signature))
            sig[10] ^= 0xFF
            return dataclasses.replace(msg, signature=__import__("base64").b64encode(
                bytes(sig)).decode())
        return msg

    lr.tamper = tamper
    res, want = run(lr)
    assert any(isinstance(e, BadKeyMessage) for e in lr.errors)
    assert bad not in res.contributors
    assert len(res.contributors) == 5
    assert np.array_equal(res.ring_sum, want)


@pytest.mark.parametrize("stage", ["ciphertexts", "bundle"])
def test_messages_to_non_neighbours_exclude_the_sender(ids: list[Identity], stage: str) -> None:
    lr = LocalRound(cfg(8, degree=4), ids[:8])
    by_id = {i.node_id: i for i in ids}
    nodes = sorted(by_id)
    graph = neighbour_graph(lr.cfg.seed, sorted(i.node_id for i in ids[:8]), 4)
    bad = sorted(i.node_id for i in ids[:8])[4]
    stranger = next(n for n in sorted(graph) if n != bad and n not in graph[bad])
    assert nodes

    def tamper(st: str, msg: Any) -> Any:
        if st != stage or msg.node_id != bad:
            return msg
        e = msg.entries[0] if msg.entries else (stranger, "", "", "")
        extra = (stranger, *e[1:])
        return dataclasses.replace(msg, entries=(*msg.entries, extra)).signed_by(by_id[bad])

    lr.tamper = tamper
    lr.setup()
    assert any(isinstance(e, NotNeighbour) for e in lr.errors)
    agg = lr.aggregator
    assert agg is not None
    assert agg.excluded[bad] == "secagg_not_neighbour"
    xs = updates(lr)
    for n in lr.live:
        lr.submit(n, lr.participants[n].masked_update(xs[n]))
    res = lr.unmask(sorted(agg.submitted))
    assert bad not in res.contributors
    assert np.array_equal(res.ring_sum, plain_sum(lr.cfg.fixed_point,
                                                  [xs[n] for n in res.contributors]))


def test_unmask_requests_are_answered_once_and_checked(ids: list[Identity]) -> None:
    lr = LocalRound(cfg(4), ids[:4])
    agg = lr.setup()
    xs = updates(lr)
    for n in lr.live:
        lr.submit(n, lr.participants[n].masked_update(xs[n]))
    req = agg.unmask_request()
    p = lr.participants[lr.live[0]]
    with pytest.raises(BadKeyMessage, match="inconsistent"):
        p.on_unmask(dataclasses.replace(req, dropped=req.survivors[:1]))
    first = p.on_unmask(req)
    assert p.on_unmask(req) is first
    with pytest.raises(SecAggError, match="already answered"):
        p.on_unmask(dataclasses.replace(req, survivors=req.survivors[1:],
                                        dropped=req.survivors[:1]))


def test_golden_vectors() -> None:
    for v in GOLDEN["prg"]:
        seed = bytes.fromhex(v["seed_hex"])
        data = mask_bytes(seed, v["start"], v["stop"])
        assert [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4)] \
            == v["words"]
        # independently: SHAKE-128 per block, straight from hashlib
        words = []
        for i in range(v["start"], v["stop"]):
            blk = hashlib.shake_128(DOMAIN + seed + (i // BLOCK).to_bytes(8, "little"))
            off = 4 * (i % BLOCK)
            words.append(int.from_bytes(blk.digest(off + 4)[off:], "little"))
        assert words == v["words"]
    d = GOLDEN["prg_digest"]
    assert hashlib.sha256(mask_bytes(bytes.fromhex(d["seed_hex"]), d["start"], d["stop"])
                          ).hexdigest() == d["sha256"]
    for k in GOLDEN["kdf"]:
        assert derive(k["label"], bytes.fromhex(k["key_hex"]), *k["context"]).hex() \
            == k["out_hex"]
    for c in GOLDEN["commit"]:
        assert commit(c["label"], bytes.fromhex(c["data_hex"]), *c["context"]) == c["out_hex"]
    for s in GOLDEN["seal"]:
        key, aad = bytes.fromhex(s["key_hex"]), bytes.fromhex(s["aad_hex"])
        sealed = bytes.fromhex(s["sealed_hex"])
        assert seal(key, aad, bytes.fromhex(s["plaintext_hex"])) == sealed
        assert open_sealed(key, aad, sealed) == bytes.fromhex(s["plaintext_hex"])
        assert open_sealed(key, aad + b"x", sealed) is None
    f = GOLDEN["fixed_point"]
    fp = FixedPoint.for_sum(f["clip"], f["max_parties"])
    assert fp.frac_bits == f["frac_bits"]
    assert list(fp.encode(array("f", f["values"]))) == f["words"]
    g = GOLDEN["graph"]
    got = neighbour_graph(bytes.fromhex(g["seed_hex"]), g["nodes"], g["k"])
    assert {k: list(v) for k, v in got.items()} == g["neighbours"]
    assert {str(n): choose_degree(int(n)) for n in GOLDEN["degrees"]} == GOLDEN["degrees"]
    sh = GOLDEN["shamir"]
    pts = {x: shamir.from_bytes(bytes.fromhex(h)) for x, h in sh["shares"]}
    assert shamir.reconstruct(pts, sh["threshold"])[0].to_bytes(32, "big").hex() \
        == sh["secret_hex"]


def test_golden_masked_update_through_the_participant(ids: list[Identity]) -> None:
    g = GOLDEN["masking"]
    fp = FixedPoint.for_sum(g["clip"], g["max_parties"])
    c = dataclasses.replace(cfg(4), fixed_point=fp, dimension=g["offset"] + len(g["values"]))
    p = SecAggParticipant(ids[0], c)
    p._self_seed = bytes.fromhex(g["self_seed_hex"])
    # a peer id below every hex node id gets -1 (we are the larger), above gets +1
    peers = {-1: "0" * 64, 1: "g" * 64}
    p.pair_keys = {peers[sign]: bytes.fromhex(key) for key, sign in g["pairs"]}
    p.masking_with = tuple(p.pair_keys)
    for pure in (False, True):
        x = array("f", g["values"]) if pure else np.asarray(g["values"], dtype=np.float32)
        msg = p.masked_update(x, offset=g["offset"])
        words = [int.from_bytes(msg.payload[i:i + 4], "little")
                 for i in range(0, len(msg.payload), 4)]
        assert words == g["words"]
        assert msg.offset == g["offset"]


def test_ml_kem_768_through_the_platform() -> None:
    k = kem()
    assert k.name == "ML-KEM-768"
    pk, sk = k.keygen()
    ct, ss = k.encaps(pk)
    assert (len(pk), len(ct), len(ss)) == (1184, 1088, 32)
    assert k.decaps(sk, ct) == ss
    with pytest.raises(ValueError, match="ML-KEM-768"):
        k.encaps(pk[:-1])


def test_shamir_needs_t_shares() -> None:
    shares = shamir.split([12345, 678], [1, 2, 3, 4, 5], 3)
    assert shamir.reconstruct({x: shares[x] for x in (2, 4, 5)}, 3) == [12345, 678]
    assert shamir.reconstruct({x: shares[x] for x in (1, 2)}, 2) != [12345, 678]
    with pytest.raises(ValueError, match="needed"):
        shamir.reconstruct({x: shares[x] for x in (1, 2)}, 3)


def test_everyone_agrees_on_the_neighbour_graph(ids: list[Identity]) -> None:
    lr = LocalRound(cfg(9, degree=4), ids[:9])
    agg = lr.setup()
    for n, p in lr.participants.items():
        assert p.neighbours == agg.graph[n]
        assert len(p.neighbours) == 4
        assert all(n in agg.graph[m] for m in p.neighbours)
    nodes = sorted(agg.graph)
    other = neighbour_graph(hashlib.sha256(b"other").digest(), nodes, 4)
    assert other != agg.graph
    assert neighbour_graph(lr.cfg.seed, list(reversed(nodes)), 4) == agg.graph
    # degree: logarithmic growth, complete graph for small rounds
    assert choose_degree(16) == 15
    assert choose_degree(100_000) < choose_degree(10_000) * 1.5 < 1000


def test_fixed_point_headroom_is_refused_when_exceeded() -> None:
    fp = FixedPoint.for_sum(1.0, 64)
    assert 64 * fp.clip * 2 ** fp.frac_bits <= 2 ** 31 - 1
    with pytest.raises(ValueError, match="overflow"):
        FixedPoint(clip=1.0, frac_bits=fp.frac_bits + 1, max_parties=64)


def test_the_server_view_of_a_masked_update_looks_uniform(ids: list[Identity]) -> None:
    lr = LocalRound(cfg(3, dim=40_000), ids[:3])
    lr.setup()
    n = lr.live[0]
    x = np.full(40_000, 0.25, dtype=np.float32)  # a very non-uniform update
    clear = np.asarray(lr.cfg.fixed_point.encode(x)).tobytes()
    masked = lr.participants[n].masked_update(x)
    # The masks are random (fresh ML-KEM secrets), so for truly uniform bytes this p-value is
    # itself uniform on [0, 1]: a 0.001 bar fails one honest run in a thousand (CI met one).
    # 1e-6 keeps a factor 10^6 between the bar and what the clear update scores (< 1e-12).
    assert byte_uniformity_p(masked.payload) > 1e-6
    assert byte_uniformity_p(clear) < 1e-12
    assert isinstance(masked, MaskedUpdate)


def test_messages_round_trip_as_canonical_json(ids: list[Identity]) -> None:
    lr = LocalRound(cfg(3), ids[:3])
    lr.setup()
    p = next(iter(lr.participants.values()))
    adv = p.advertise()
    back = KeyAdvert.from_json(adv.to_json())
    assert back == adv
    assert back.verify(ids[[i.node_id for i in ids].index(p.me)].public_key)
    with pytest.raises(Exception, match="exactly the fields"):
        ShareBundle.from_json(adv.to_json())
    resp = UnmaskResponse(run_id="r", round=0, node_id="ab", self_shares=(("d", "00"),))
    assert UnmaskResponse.from_json(resp.to_json()) == resp
    assert math.isfinite(float(len(adv.to_json())))


def test_the_uniformity_tests_accept_uniform_and_reject_skewed_data() -> None:
    rng = np.random.default_rng(3)
    from shared.secagg.stats import ks_uniform_p

    assert ks_uniform_p(rng.uniform(size=200).tolist()) > 0.001
    assert ks_uniform_p((rng.uniform(size=200) ** 2).tolist()) < 1e-4
    assert byte_uniformity_p(rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes()) > 0.001
    assert byte_uniformity_p(rng.integers(0, 200, 100_000, dtype=np.uint8).tobytes()) < 1e-12
