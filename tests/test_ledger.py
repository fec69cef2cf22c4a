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
