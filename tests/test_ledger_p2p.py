"""Slashing an owner outvoted on a p2p shard digest (issue 19): real signed Shard result frames
and the server's real signed ShardPlans go through the coordinator's slashing and the p2p
reduction in process; the slash entry's `p2p_outvoted` evidence verifies offline from the
export, and tampered evidence (a swapped frame, a plan that does not name the node, no
majority, another shard) does not."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.coordinator import Coordinator
from server.p2p import P2PReduction
from server.peers import Connection, Peer
from server.runstate import RunState, open_run
from shared.envelope import Identity, sign_round
from shared.frame import decode_frame
from shared.ledger import TamperedLedger, canonical
from shared.ledger_audit import evidence_checker, parse_export, verify_export
from shared.messages import SERVER, Shard, ShardPlan, message_from_frame
from shared.p2p import ShardCheck, encode_result, make_plan, revise

RUN = {"model": "mlp-digits", "transport": "p2p", "aggregator": "median", "quorum": 3,
       "ledger_faucet": 500}


class NullWs:
    async def send_bytes(self, data: bytes) -> None:
        return None

    async def close(self) -> None:
        return None


def signed(ident: Identity, run: RunState, msg: Any) -> bytes:
    data: bytes = msg.to_frame(sign=ident.signer(run_id=run.run_id,
                                                 round_=sign_round(msg.round),
                                                 msg_type=msg.TYPE, nonce=msg.nonce))
    return data


class Owners:
    """Three trainers in a p2p reduction of round 0; the first lies about its shards."""

    def __init__(self, tmp: Path) -> None:
        self.run = open_run(tmp / "run", RUN)
        self.coord = Coordinator(self.run)
        red = self.coord.reduction
        assert isinstance(red, P2PReduction)
        self.red = red
        ids = sorted((Identity.generate() for _ in range(3)), key=lambda i: i.node_id)
        self.ids = {i.node_id: i for i in ids}
        self.plan = make_plan(0, self.ids, self.run.n_params, replicas=2)
        self.check = ShardCheck(self.plan, result_codec="fp16")
        red._p2p = (self.plan, self.check)
        red._plan_frame(self.plan)  # what reduce() sends first
        self.conns = {n: Connection(ws=NullWs(), remote="test", peer=Peer(
            node_id=n, runtime="native", device="cpu", shard=0, ws=NullWs(), role="trainer",
            transport="p2p"), public_key=i.public_key) for n, i in self.ids.items()}

    def result(self, node: str, shard: int, lie: bool) -> bytes:
        lo, hi = self.plan.bounds(shard)
        vec = np.full(hi - lo, 0.25, dtype=np.float32)
        if lie:
            vec[0] = 1000.0
        plan = self.red._p2p[0] if self.red._p2p else self.plan
        msg = Shard(run_id=self.run.run_id, round=0, node_id=node, to=SERVER, kind="result",
                    shard=shard, revision=plan.revision, payload=encode_result(vec, "fp16"))
        return signed(self.ids[node], self.run, msg)

    async def send(self, node: str, data: bytes) -> None:
        ident = self.ids[node]
        msg = self.coord.slashing.decode(decode_frame(data, max_payload=1 << 24), data, node,
                                         ident.public_key, self.coord.max_payload)
        assert isinstance(msg, Shard)
        await self.red.on_shard(self.conns[node], msg)

    def commit(self) -> bytes:
        batch = self.run.ledger.round_batch(0, [])
        self.run.store.append_ledger(batch)
        self.run.ledger.done(batch)
        return self.run.ledger.export()


async def outvoted_export(tmp: Path) -> tuple[Owners, str, bytes]:
    o = Owners(tmp)
    liar = o.plan.owners[0][0]  # owners of shard 0: the liar and one honest owner
    honest = o.plan.owners[0][1]
    await o.send(liar, o.result(liar, 0, lie=True))
    await o.send(honest, o.result(honest, 0, lie=False))
    plan = o.red._p2p[0] if o.red._p2p else o.plan
    extra = [m for m in plan.owners[0] if m not in (liar, honest)]
    assert plan.revision == 1
    assert len(extra) == 1
    await o.send(extra[0], o.result(extra[0], 0, lie=False))
    assert o.check.agreed[0]
    assert o.check.liars == {liar: [0]}
    return o, liar, o.commit()


async def test_an_outvoted_owner_is_slashed_with_evidence_that_verifies(tmp_path: Path) -> None:
    o, liar, data = await outvoted_export(tmp_path)
    state = verify_export(data, server_key=o.run.identity.public_key
                          if o.run.identity else None)
    assert state.slashes == 1
    exp = parse_export(data)
    slash = next(r["entry"] for r in exp.records if r["entry"]["kind"] == "slash")
    assert slash["body"]["node"] == liar
    ev = slash["body"]["evidence"]
    assert ev["kind"] == "p2p_outvoted"
    assert ev["round"] == 0
    assert ev["shard"] == 0
    assert len(ev["frames"]) == 5
    assert len(ev["keys"]) == 2
    lo = message_from_frame(decode_frame(exp.blobs[ev["frames"][1]]))
    hi = message_from_frame(decode_frame(exp.blobs[ev["frames"][2]]))
    assert isinstance(lo, ShardPlan)
    assert isinstance(hi, ShardPlan)
    assert (lo.plan["revision"], hi.plan["revision"]) == (0, 1)
    acct = o.run.ledger.account(liar)
    assert acct["slashes"][0]["evidence"] == "p2p_outvoted"


def rewrite(data: bytes, edit: Any) -> bytes:
    """The export with the slash's evidence edited (the records then no longer match their
    hashes, so the check is run on the evidence alone as well)."""
    exp = parse_export(data)
    for r in exp.records:
        if r["entry"]["kind"] == "slash":
            edit(r["entry"]["body"]["evidence"], exp.blobs)
    return b"\n".join(canonical(r) for r in exp.records) + b"\n"


async def test_tampered_p2p_evidence_fails_verify(tmp_path: Path) -> None:
    o, liar, data = await outvoted_export(tmp_path)
    exp = parse_export(data)
    slash = next(r["entry"] for r in exp.records if r["entry"]["kind"] == "slash")
    ev = slash["body"]["evidence"]
    key = o.run.identity.public_key if o.run.identity else None
    check = evidence_checker(exp.blobs, key)
    check(ev, liar, 0, o.run.run_id)  # the untouched evidence checks
    honest = [n for n in o.ids if n != liar]
    blobs = dict(exp.blobs)

    def add(frame: bytes) -> str:
        name = hashlib.sha256(frame).hexdigest()
        blobs[name] = frame
        return name

    f = ev["frames"]
    assert o.run.identity is not None
    other_members = signed(o.run.identity, o.run, ShardPlan(
        run_id=o.run.run_id, round=0, plan=revise(o.plan, gone=[honest[0]]).to_dict(),
        rule="median", byzantine_fraction=0.0, result_codec="fp16"))
    forged_plan = signed(Identity.generate(), o.run, ShardPlan(
        run_id=o.run.run_id, round=0, plan=o.plan.to_dict(), rule="median",
        byzantine_fraction=0.0, result_codec="fp16"))
    cases = {
        "the liar's frame swapped for an agreeing one": {**ev, "frames": [f[3], *f[1:]]},
        "a plan not signed by the server": {**ev, "frames": [f[0], f[1], add(forged_plan),
                                                             *f[3:]]},
        "the first plan as the judging one (one owner short)": {
            **ev, "frames": [f[0], f[1], f[1], *f[3:]]},
        "no majority: one agreeing owner": {**ev, "frames": f[:4], "keys": ev["keys"][:1]},
        "another shard": {**ev, "shard": 1},
        "another round": {**ev, "round": 1},
        "a key that did not sign the frame": {**ev, "keys": ev["keys"][::-1]},
        "an agreeing frame counted twice": {**ev, "frames": [*f[:3], f[3], f[3]],
                                            "keys": [ev["keys"][0]] * 2},
        "the liar's own frame as its accuser": {**ev, "frames": [*f[:3], f[0]],
                                               "keys": [ev["pk"]]},
        "a frame missing from the export": {**ev, "frames": [*f[:4], "0" * 64]},
        "plans of two member sets": {**ev, "frames": [f[0], add(other_members), *f[2:]]},
    }
    check = evidence_checker(blobs, key)
    accepted = []
    for what, bad in cases.items():
        try:
            check(bad, liar, 0, o.run.run_id)
        except TamperedLedger:
            continue
        accepted.append(what)
    assert accepted == []
    with pytest.raises(TamperedLedger):  # no server key: p2p evidence cannot be checked
        evidence_checker(exp.blobs)(ev, liar, 0, o.run.run_id)
    # in the export: a changed evidence byte (the blob) fails the whole verify
    name = ev["frames"][2]
    lines = []
    for line in data.split(b"\n"):
        if line.startswith(b'{"data"') and json.loads(line)["evidence"] == name:
            obj = json.loads(line)
            raw = bytearray(bytes.fromhex(obj["data"]))
            raw[-1] ^= 1
            obj["data"] = raw.hex()
            line = canonical(obj)
        lines.append(line)
    with pytest.raises(TamperedLedger, match="missing or altered"):
        verify_export(b"\n".join(lines), server_key=key)


async def test_an_owner_outvoted_without_its_frames_is_not_slashed(tmp_path: Path) -> None:
    o = Owners(tmp_path)
    liar, honest = o.plan.owners[0]
    o.coord.slashing.results.clear()
    await o.red.on_shard(o.conns[liar], Shard(  # a result slashing never saw signed
        run_id=o.run.run_id, round=0, node_id=liar, to=SERVER, kind="result", shard=0,
        revision=0, payload=encode_result(np.full(o.plan.bounds(0)[1], 9.0, np.float32),
                                          "fp16")))
    await o.send(honest, o.result(honest, 0, lie=False))
    extra = next(m for m in o.red._p2p[0].owners[0] if m not in (liar, honest)) \
        if o.red._p2p else ""
    await o.send(extra, o.result(extra, 0, lie=False))
    assert o.check.liars == {liar: [0]}
    assert not o.run.ledger.pending
