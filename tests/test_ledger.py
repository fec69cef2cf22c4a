"""The ledger (shared.ledger, server.ledger): a run with attackers ends with a chain that
verifies offline, conserves supply, slashes only with evidence and detects tampering;
unstaked identities are refused at the socket; bad requests are typed errors that write
nothing; a passed proposal changes the config at a round boundary (bench.ledger, small). The
run and the request checks run on both store backends, SQLite and PostgreSQL (db_url)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ledger import BenchNode, bench, stake, verify_data_dir
from server.coordinator import Coordinator
from server.runstate import open_run
from shared.ledger import (
    BadRequestSignature,
    FixedSetting,
    InsufficientBalance,
    LedgerError,
    LedgerState,
    ReplayedRequest,
    TamperedLedger,
    UnknownSetting,
)
from shared.ledger_audit import verify_export

ROOT = Path(__file__).resolve().parents[1]


async def test_a_run_with_attackers_verifies_and_detects_tampering(db_url: str | None) -> None:
    out = await bench(rounds=2, honest=3, flood_n=20, trials=40, seed=1, db=db_url)
    assert out["backends"] == ["sqlite" if db_url is None else "postgresql"]
    assert out["rounds"] == 2
    assert out["tamper_detected"] == out["tamper_trials"] == 40
    assert out["supply_conserved"]
    assert out["slashed"] >= 6  # equivocation + invalid frame + validation, each round
    assert out["slash_without_evidence"] == 0
    assert out["sybil_identities_admitted_without_stake"] == 0
    assert out["refused_requests"] == "5/5"
    assert out["governance_applied"]


def test_bad_requests_are_typed_and_write_nothing(tmp_path: Path, db_url: str | None) -> None:
    run = open_run(tmp_path / "run", {"model": "mlp-digits", "ledger_faucet": 500}, None, db_url)
    coord = Coordinator(run)
    node, other = BenchNode(coord), BenchNode(coord)
    stake(run, node, 100)
    prop = run.ledger.submit(node.request(run, "propose", key="inner_lr", value=0.02))
    vote = node.request(run, "vote", proposal=prop["seq"], support=True)
    run.ledger.submit(vote)
    forged = node.request(run, "stake", amount=1)
    forged["amount"] = 2
    cases: list[tuple[dict[str, object], type[LedgerError]]] = [
        (forged, BadRequestSignature),
        (node.request(run, "stake", amount=10**9), InsufficientBalance),
        (node.request(run, "propose", key="warp_speed", value=1), UnknownSetting),
        (node.request(run, "propose", key="codec", value="int8"), FixedSetting),
        (node.request(run, "propose", key="inner_lr", value=-1.0), LedgerError),
        (vote, ReplayedRequest),
        (other.request(run, "vote", proposal=prop["seq"], support=True), InsufficientBalance),
    ]
    before = (run.ledger.state.seq, run.store.ledger_records()[-1]["hash"])
    for req, kind in cases:
        with pytest.raises(kind):
            run.ledger.submit(req)
        assert (run.ledger.state.seq, run.store.ledger_records()[-1]["hash"]) == before
    export = run.ledger.export()
    state = verify_export(export, server_key=run.identity.public_key if run.identity else None)
    assert state.stakes[node.ident.node_id] == 100
    with pytest.raises(TamperedLedger):  # another server's key pinned
        verify_export(export, server_key=BenchNode(coord).ident.public_key)
    with pytest.raises(TamperedLedger):  # truncated: the signed head is gone
        verify_export(b"\n".join(export.split(b"\n")[:-2]) + b"\n")
    head = run.ledger.state.head
    run.store.close()
    assert verify_data_dir(tmp_path / "run", db_url)["verified"]
    again = open_run(tmp_path / "run", {}, None, db_url)  # resumed from the same database
    try:
        assert (again.run_id, again.ledger.state.head) == (run.run_id, head)
        assert again.ledger.state.stakes[node.ident.node_id] == 100
    finally:
        again.store.close()


def test_cli_verifies_a_file_and_refuses_an_edited_one(tmp_path: Path) -> None:
    run = open_run(tmp_path / "run", {"model": "mlp-digits", "ledger_faucet": 500})
    node = BenchNode(Coordinator(run))
    stake(run, node, 100)
    good, bad = tmp_path / "good.ndjson", tmp_path / "bad.ndjson"
    good.write_bytes(run.ledger.export())
    bad.write_bytes(good.read_bytes().replace(b'"amount":100', b'"amount":900'))
    run.store.close()
    cmd = [sys.executable, "-m", "native_node", "ledger", "verify", "--file"]
    ok = subprocess.run([*cmd, str(good)], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.splitlines()[-1])["verified"]
    no = subprocess.run([*cmd, str(bad)], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=False)
    assert no.returncode == 1
    assert not json.loads(no.stdout.splitlines()[-1])["verified"]


def test_a_proposal_that_does_not_pass_expires(tmp_path: Path, db_url: str | None) -> None:
    """ledger_proposal_rounds = 2: a proposal without a majority is closed by an `expire`
    entry in the batch of the second round committed after it; a vote on it is then refused,
    and the verifier refuses an `expire` entry that comes too early."""
    run = open_run(tmp_path / "run", {"model": "mlp-digits", "ledger_faucet": 500,
                                      "ledger_proposal_rounds": 2}, None, db_url)
    node, other = BenchNode(Coordinator(run)), BenchNode(Coordinator(run))
    stake(run, node, 100)
    stake(run, other, 300)
    prop = run.ledger.submit(node.request(run, "propose", key="inner_lr", value=0.02))
    run.ledger.submit(node.request(run, "vote", proposal=prop["seq"], support=True))
    (open_,) = run.ledger.view()["open_proposals"]
    assert (open_["seq"], open_["expires_after_round"], open_["yes"]) == (prop["seq"], 1, 100)
    for r in range(2):
        assert run.ledger.view()["open_proposals"], f"expired before round {r} committed"
        run.commit(round_=r, params=run.params, momentum=run.momentum, attempts=1,
                   eval_loss=None, train_loss=None, updates=[], bytes_up=0, bytes_down=0,
                   duration_s=0.0)
    assert run.ledger.view()["open_proposals"] == []
    kinds = [(r["entry"]["kind"], r["entry"]["round"]) for r in run.store.ledger_records()]
    assert kinds[-2:] == [("reward", 1), ("expire", 1)]
    assert run.config.inner_lr != 0.02
    with pytest.raises(LedgerError, match="no open proposal"):
        run.ledger.submit(other.request(run, "vote", proposal=prop["seq"], support=True))
    export = run.ledger.export()
    verify_export(export)
    # the same expire entry one round early (moved before round 1's reward) does not verify
    lines = export.split(b"\n")
    records = [json.loads(x)["entry"] for x in lines if x.startswith(b'{"entry"')]
    state = LedgerState()
    for entry in records[:-2]:
        state.apply(entry)
    with pytest.raises(TamperedLedger, match="due to expire"):
        state.apply(records[-1])
    run.store.close()
