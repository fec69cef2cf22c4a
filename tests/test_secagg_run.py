"""Secure aggregation in a run: the real coordinator (server.secagg_round) and the one
participant implementation (shared.participant, as native nodes, tabs and the simulator run
it), over memory. The committed aggregate is checked against the plain fixed-point sum of what
the participants trained; dropouts after submitting and bad input at every stage (typed error,
sender excluded, the rest still unmasked exactly)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.secagg_run import Live, Tamper, committed_as, live_run, until
from bench.simulate import simulate
from server.config import RunConfig
from server.coordinator import Coordinator
from server.runstate import open_run
from shared.messages import Message, SecAgg, Submit, sha256_hex
from shared.platform import PqcryptoMLKEM768
from shared.secagg import FixedPoint
from shared.secagg.messages import KeyAdvert, MaskedUpdate, ShareBundle, UnmaskResponse
from shared.secagg.round import pack_masked, unpack_masked


@contextlib.asynccontextmanager
async def secure_run(tmp_path: Path, nodes: int, tampers: dict[int, Tamper] | None = None,
                     **config: Any) -> AsyncIterator[tuple[Coordinator, list[Live]]]:
    async with live_run(tmp_path / "run", nodes, tampers, **{
            "secagg": True, "secagg_clip": 0.5, "secagg_timeout_s": 5.0, **config}) as out:
        yield out


def deltas(n: int, count: int, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.3, 0.3, n).astype(np.float32) for _ in range(count)]


def expect_commit(coord: Coordinator, start: tuple[np.ndarray, np.ndarray],
                  plains: list[bytes]) -> None:
    """The round committed theta0 - step(mean), mean = the exact fixed-point sum / n."""
    assert len(coord.status()["secagg"]["last"]["contributors"]) == len(plains)
    assert committed_as(coord, start, plains)


async def train_all(lives: list[Live], ds: list[np.ndarray]) -> None:
    await until(lambda: all(lv.trains for lv in lives), "every node to get the round")
    for lv, d in zip(lives, ds, strict=True):
        await lv.train(d)


@pytest.mark.parametrize("transport", ["ws", "star"])
async def test_the_committed_aggregate_is_the_exact_mean_of_the_masked_updates(
        tmp_path: Path, transport: str) -> None:
    async with secure_run(tmp_path, 3, quorum=3, transport=transport) as (coord, lives):
        theta0 = (np.asarray(coord.run.params).copy(), np.asarray(coord.run.momentum).copy())
        ds = deltas(coord.run.n_params, 3)
        await train_all(lives, ds)
        await until(lambda: coord.run.version == 1, "the commit")
        fp = FixedPoint.for_sum(0.5, 3)
        for lv, d in zip(lives, ds, strict=True):  # what each node masked is its own update
            assert lv.plain[0] == fp.encode(d).astype("<u4").tobytes()
            assert lv.errors == []
        expect_commit(coord, theta0, [lv.plain[0] for lv in lives])
        rows = coord.run.store.update_keys(0)
        assert sorted(rows) == sorted(lv.part.node_id for lv in lives)
        assert coord.counters["secagg_rounds"] == 1


async def test_a_node_dropping_after_its_masked_update_is_still_in_the_sum(
        tmp_path: Path) -> None:
    async with secure_run(tmp_path, 3, quorum=2) as (coord, lives):
        theta0 = (np.asarray(coord.run.params).copy(), np.asarray(coord.run.momentum).copy())
        ds = deltas(coord.run.n_params, 3, seed=5)
        await until(lambda: all(lv.trains for lv in lives), "the round")
        await lives[2].train(ds[2])
        await until(lambda: len(coord.state.updates) == 1 if coord.state else False, "accept")
        lives[2].leave()  # gone before the unmask request: its update must still count
        await lives[0].train(ds[0])
        await lives[1].train(ds[1])
        await until(lambda: coord.run.version == 1, "the commit")
        last = coord.status()["secagg"]["last"]
        assert lives[2].part.node_id in last["contributors"]
        assert lives[2].part.node_id not in last["responders"]
        expect_commit(coord, theta0, [lv.plain[0] for lv in lives])
        assert coord.counters["secagg_dropped_after_submit"] == 1


async def test_too_many_dropouts_retry_the_round_with_fresh_keys(tmp_path: Path) -> None:
    """4 nodes (k = 3, t = 2): two drop after submitting, so no survivor's seed has t answers:
    the server commits nothing, re-keys the round among the two left, which mask their held
    updates again, and the round commits their exact mean."""
    async with secure_run(tmp_path, 4, quorum=2) as (coord, lives):
        start = (np.asarray(coord.run.params).copy(), np.asarray(coord.run.momentum).copy())
        ds = deltas(coord.run.n_params, 4, seed=11)
        await until(lambda: coord.status()["secagg"]["stage"] == "masking", "the keys")
        for lv, d in zip(lives[:2], ds, strict=False):
            await lv.train(d)
        await until(lambda: len(coord.state.updates) == 2 if coord.state else False, "accept")
        for lv in lives[:2]:
            lv.leave()
        for lv, d in zip(lives[2:], ds[2:], strict=True):
            await lv.train(d)
        first = {lv.part.node_id: lv.plain[0] for lv in lives[2:]}
        await until(lambda: coord.run.version == 1, "the commit after the retry", timeout=60)
        assert coord.counters["secagg_unmask_failed"] == 1
        last = coord.status()["secagg"]["last"]
        assert sorted(last["contributors"]) == sorted(first)
        bits = last["frac_bits"]  # finer now: the fixed point is sized for 2, not 4
        for lv, d in zip(lives[2:], ds[2:], strict=True):  # the held update, masked again
            assert lv.plain[0] != first[lv.part.node_id]
            again = np.frombuffer(lv.plain[0], dtype="<u4").view(np.int32) / 2 ** bits
            assert np.abs(again - d).max() <= 2 ** -bits
        expect_commit(coord, start, [lv.plain[0] for lv in lives[2:]])


async def test_a_node_joining_after_the_keys_does_not_hold_the_round_up(
        tmp_path: Path) -> None:
    async with secure_run(tmp_path, 3, quorum=3, deadline_s=120.0) as (coord, lives):
        await until(lambda: coord.status()["secagg"]["stage"] == "masking", "the keys")
        late = Live(coord)
        await coord.greet(late.conn)
        await late.pump()
        await until(lambda: bool(late.trains), "the late node's RoundOpen")
        t0 = asyncio.get_running_loop().time()
        await train_all(lives, deltas(coord.run.n_params, 3))
        await until(lambda: coord.run.version == 1, "the commit")
        assert asyncio.get_running_loop().time() - t0 < 30  # not the 120 s deadline
        assert late.part.node_id not in coord.status()["secagg"]["last"]["contributors"]


async def test_dp_clips_and_noises_before_masking(tmp_path: Path) -> None:
    """With dp_clip each node privatizes its update first (shared.dp), then masks it: what
    was masked is the clipped update, and the committed mean is still its exact sum."""
    async with secure_run(tmp_path, 3, quorum=3, dp_clip=0.01, dp_noise_multiplier=0.0
                          ) as (coord, lives):
        start = (np.asarray(coord.run.params).copy(), np.asarray(coord.run.momentum).copy())
        await train_all(lives, deltas(coord.run.n_params, 3))
        await until(lambda: coord.run.version == 1, "the commit")
        bits = coord.status()["secagg"]["last"]["frac_bits"]
        for lv in lives:
            x = np.frombuffer(lv.plain[0], dtype="<u4").view(np.int32) / 2 ** bits
            assert np.linalg.norm(x) <= 0.01 * 1.001  # clipped to C (plus rounding)
        expect_commit(coord, start, [lv.plain[0] for lv in lives])


def _bad_advert_signature(live: Live, msg: Message) -> Message:
    if isinstance(msg, SecAgg) and msg.stage == "advert":
        adv = KeyAdvert.from_json(msg.payload)
        sig = bytearray(base64.b64decode(adv.signature))
        sig[10] ^= 1
        bad = dataclasses.replace(adv, signature=base64.b64encode(bytes(sig)).decode())
        return dataclasses.replace(msg, payload=bad.to_json())
    return msg


def _shares_to_a_stranger(live: Live, msg: Message) -> Message:
    if isinstance(msg, SecAgg) and msg.stage == "bundle":
        b = ShareBundle.from_json(msg.payload)
        entries = (("ee" * 32, *b.entries[0][1:]), *b.entries[1:])
        bad = dataclasses.replace(b, entries=entries, signature="").signed_by(
            live.part.identity)
        return dataclasses.replace(msg, payload=bad.to_json())
    return msg


def _a_share_failing_its_commitment(live: Live, msg: Message) -> Message:
    if isinstance(msg, SecAgg) and msg.stage == "unmask":
        r = UnmaskResponse.from_json(msg.payload)
        dealer, share = r.self_shares[0]
        bad_share = format(int(share, 16) ^ 1, f"0{len(share)}x")
        bad = dataclasses.replace(r, self_shares=((dealer, bad_share), *r.self_shares[1:]),
                                  signature="").signed_by(live.part.identity)
        return dataclasses.replace(msg, payload=bad.to_json())
    return msg


async def test_a_share_failing_its_commitment_is_ignored_and_its_holder_flagged(
        tmp_path: Path) -> None:
    """4 nodes (k = 3, t = 2): one reveals a wrong share at the unmask; it fails the dealer's
    commitment, is ignored (the others' shares suffice) and its holder is flagged, with
    evidence; its own update stays in the exact sum."""
    tampers: dict[int, Tamper] = {3: _a_share_failing_its_commitment}
    async with secure_run(tmp_path, 4, tampers, quorum=4) as (coord, lives):
        start = (np.asarray(coord.run.params).copy(), np.asarray(coord.run.momentum).copy())
        await train_all(lives, deltas(coord.run.n_params, 4, seed=13))
        await until(lambda: coord.run.version == 1, "the commit")
        last = coord.status()["secagg"]["last"]
        bad = lives[3].part.node_id
        assert last["flagged"] == {bad: "secagg_bad_share"}
        assert bad in last["contributors"]
        rows = coord.run.store.rejections(node_id=bad)
        assert [r["code"] for r in rows] == ["secagg_bad_share"]
        expect_commit(coord, start, [lv.plain[0] for lv in lives])


def _masked(change: Callable[[MaskedUpdate], MaskedUpdate]) -> Tamper:
    def tamper(live: Live, msg: Message) -> Message:
        if isinstance(msg, Submit) and msg.codec == "secagg":
            mu = change(unpack_masked(msg.payload))
            mu = dataclasses.replace(mu, payload_sha256=sha256_hex(mu.payload),
                                     signature="").signed_by(live.part.identity)
            payload = pack_masked(mu)
            return dataclasses.replace(msg, payload=payload, digest=sha256_hex(payload))
        return msg
    return tamper


@pytest.mark.parametrize(("tamper", "code", "in_roster"), [
    (_bad_advert_signature, "secagg_bad_key_message", False),
    (_shares_to_a_stranger, "secagg_not_neighbour", True),
    (_masked(lambda m: dataclasses.replace(m, payload=m.payload[:-4], length=m.length - 1)),
     "secagg_bad_masked_update", True),
    (_masked(lambda m: dataclasses.replace(m, ring_bits=64)), "secagg_bad_masked_update", True),
], ids=["advert-signature", "shares-to-wrong-peer", "wrong-length", "wrong-ring"])
async def test_bad_input_excludes_the_sender_and_the_rest_unmask_exactly(
        tmp_path: Path, tamper: Tamper, code: str, in_roster: bool) -> None:
    async with secure_run(tmp_path, 4, {3: tamper}, quorum=3) as (coord, lives):
        theta0 = (np.asarray(coord.run.params).copy(), np.asarray(coord.run.momentum).copy())
        ds = deltas(coord.run.n_params, 4, seed=7)
        await until(lambda: all(lv.trains for lv in lives), "the round")
        await until(lambda: coord.status()["secagg"]["stage"] == "masking", "the key stages",
                    timeout=20)
        for lv, d in zip(lives, ds, strict=True):
            await lv.train(d)
        await until(lambda: coord.run.version == 1, "the commit")
        bad = lives[3]
        assert code in [c for c, _ in bad.errors], bad.errors
        assert coord.rejected[code] >= 1
        last = coord.status()["secagg"]["last"]
        assert bad.part.node_id not in last["contributors"]
        assert (bad.part.node_id in coord.secagg.agg.roster) == in_roster  # type: ignore[union-attr]
        expect_commit(coord, theta0, [lv.plain[0] for lv in lives[:3]])


@pytest.mark.parametrize(("key", "value", "says"), [
    ("aggregator", "median", "secure aggregation hides"),
    ("validation", True, "secure aggregation hides"),
    ("autotune", True, "secagg"),
])
def test_secagg_refuses_what_needs_individual_updates(key: str, value: Any, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        RunConfig(secagg=True, **{key: value})
    if key != "transport":
        RunConfig(**{key: value})  # fine without secagg



# -- the tab's side: the JS PRG / KDF / masking and ML-KEM-768 (browser/node/secagg.js) ------
ROOT = Path(__file__).resolve().parent.parent
JS_RUNNER = ROOT / "tests" / "js" / "secagg_node.mjs"


def _node(*args: str, stdin: str = "") -> Any:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    proc = subprocess.run([node, str(JS_RUNNER), *args], input=stdin, capture_output=True,
                          text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_the_js_mask_prg_matches_the_golden_vectors() -> None:
    results = _node("golden", str(ROOT / "shared" / "testdata" / "secagg.json"))
    assert len(results) >= 9  # every prg vector, the 200,000-word digest, kdf, one masking
    assert [r for r in results if not r["ok"]] == []


def test_ml_kem_768_agrees_between_pqcrypto_and_the_tabs_noble() -> None:
    py = PqcryptoMLKEM768()
    pk, sk = py.keygen()
    first = _node("kem", stdin=json.dumps({"public_key": pk.hex()}))
    assert py.decaps(sk, bytes.fromhex(first["ciphertext"])).hex() == first["shared_secret"]
    ct, ss = py.encaps(bytes.fromhex(first["public_key"]))
    second = _node("kem", stdin=json.dumps({"public_key": pk.hex(), "ciphertext": ct.hex(),
                                            "secret_key": first["secret_key"]}))
    assert second["decapsulated"] == ss.hex()


def test_the_simulators_nodes_aggregate_securely_like_the_plain_mean(tmp_path: Path) -> None:
    """bench.simulate's nodes are the same participant: with secagg their round commits the
    masked sum's mean, which is the plain run's within the fixed point's rounding."""
    kw = {"nodes": 4, "rounds": 2, "byzantine": 0.0, "attack": "sign-flip",
          "aggregator": "mean", "inner_steps": 5, "progress": False}
    sec = asyncio.run(simulate(**kw, data_dir=tmp_path / "secagg",  # type: ignore[arg-type]
                               extra_config={"secagg": True, "quorum": 4}))
    plain = asyncio.run(simulate(**kw, data_dir=tmp_path / "plain",  # type: ignore[arg-type]
                                 extra_config={"quorum": 4}))
    for out in (sec, plain):
        assert out["summary"]["node_errors"] == 0
    s, p = sec["summary"], plain["summary"]
    assert s["final_eval_loss"] < s["initial_eval_loss"]
    assert np.isclose(s["final_eval_loss"], p["final_eval_loss"], rtol=1e-4)
    # the run was a secure one: a clear Submit there is refused (it would be a node error)
    assert open_run(Path(s["data_dir"]) / "run", {}).config.secagg is True
