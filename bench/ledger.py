"""python -m bench.ledger: a run with attackers, its ledger checked offline and tampered with.

In process: the real coordinator, run state, store and ledger (frames go through
Coordinator.handle_frame, requests through LedgerBook.submit, the code POST
/api/ledger/request runs). Staked honest nodes (faucet with proof of work, then stake) train
small updates; three staked attackers each misbehave once per round: one equivocates (two
different signed updates), one sends a signed frame the schema refuses, one sends an update
validation rejects. A proposal (inner_steps) passes by stake vote and applies at a round
boundary. Bad requests (bad signature, insufficient balance, unknown and fixed settings, a
replayed vote) must be refused with nothing written. Then 1,000 fresh identities without
stake say Hello at the socket's pre-Hello check (server/ws.py), the export is verified
(shared.ledger_audit), and random single-byte edits, entry edits, deletions and reorderings
of it must all be detected.

The whole run is repeated on each backend of the store (server.sqldb): SQLite, then
PostgreSQL on a throwaway server this bench starts (bench.pgserver; or `--pg-url`). Without
PostgreSQL installed it says why and runs SQLite only.

Last line: JSON with rounds, entries, verify_s, tamper_trials, tamper_detected,
supply_conserved, slashed, slash_without_evidence, sybil_identities_admitted_without_stake,
refused_requests, governance_applied, backends. The counts are summed over the backends'
runs, the booleans hold for every run, verify_s is the slowest run's; `by_backend` has each
run's own figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench import pgserver
from bench.scratch import scratch
from server.coordinator import Coordinator
from server.peers import Connection
from server.runstate import RunState, open_run
from server.store import Store
from server.ws import _pre_hello_check
from shared.codecs import get_codec
from shared.envelope import Identity, new_nonce
from shared.frame import decode_frame, encode_frame
from shared.ledger import LedgerError, TamperedLedger, canonical, sign_request, solve_pow, verify
from shared.ledger_audit import evidence_checker, genesis_key, parse_export, verify_export
from shared.messages import Hello, Message, Submit, sha256_hex

log = logging.getLogger("bench.ledger")


class Sink:
    """server.peers.Sender into memory (the bench reads frames it needs from its own side)."""

    def __init__(self) -> None:
        self.data: list[bytes] = []

    async def send_bytes(self, data: bytes) -> None:
        self.data.append(data)

    async def close(self) -> None:
        return None


class BenchNode:
    def __init__(self, coord: Coordinator) -> None:
        self.coord, self.ident, self.sink = coord, Identity.generate(), Sink()
        self.conn = Connection(ws=self.sink, remote="bench")

    def frame(self, msg: Message) -> bytes:
        return msg.to_frame(sign=self.ident.signer(
            run_id=self.coord.run.run_id, round_=getattr(msg, "round", -1), msg_type=msg.TYPE,
            nonce=msg.nonce))

    def hello(self, challenge: str) -> bytes:
        return self.frame(Hello(node_id=self.ident.node_id,
                                public_key=self.ident.public_key.hex(), challenge=challenge,
                                nonce=new_nonce(), runtime="native", agent="bench",
                                device="cpu"))

    async def join(self) -> None:
        await self.coord.greet(self.conn)
        await self.coord.handle_frame(self.conn, self.hello(self.conn.challenge))

    def submit(self, round_: int, delta: np.ndarray) -> bytes:
        payload = get_codec("raw32").encode(delta.astype(np.float32))
        return self.frame(Submit(run_id=self.coord.run.run_id, round=round_,
                                 node_id=self.ident.node_id, nonce=new_nonce(), codec="raw32",
                                 length=delta.size, digest=sha256_hex(payload), train_loss=1.0,
                                 samples=32, compute_s=0.1, payload=payload))

    def invalid(self, round_: int, n: int) -> bytes:
        """A Submit the node signs whose header the schema refuses (samples out of range)."""
        frame = decode_frame(self.submit(round_, np.zeros(n, np.float32)))
        header = {**frame.header, "samples": 10**18, "nonce": new_nonce()}
        return encode_frame(Submit.TYPE, header, frame.payload, sign=self.ident.signer(
            run_id=self.coord.run.run_id, round_=round_, msg_type=Submit.TYPE,
            nonce=header["nonce"]))

    def request(self, run: RunState, op: str, **fields: Any) -> dict[str, Any]:
        nonce = run.ledger.state.nonces.get(self.ident.node_id, 0)
        req = {"op": op, "run_id": run.run_id, "node": self.ident.node_id,
               "pk": self.ident.public_key.hex(), "nonce": nonce, **fields}
        return sign_request(req, secret_key=self.ident.secret_key)


def stake(run: RunState, node: BenchNode, amount: int) -> None:
    bits = run.config.ledger_pow_bits
    run.ledger.submit(node.request(run, "faucet",
                                   pow=solve_pow(run.run_id, node.ident.node_id, bits)))
    run.ledger.submit(node.request(run, "stake", amount=amount))


def bad_requests(run: RunState, node: BenchNode, proposal: int) -> int:
    """Each must be a typed LedgerError with nothing written; returns how many were."""
    before = run.ledger.state.seq
    forged = node.request(run, "transfer", to="ab" * 32, amount=1)
    forged["amount"] = 2  # signed for 1
    replay = node.request(run, "vote", proposal=proposal, support=True)
    cases = [forged, node.request(run, "transfer", to="ab" * 32, amount=10**12),
             node.request(run, "propose", key="no_such_setting", value=1),
             node.request(run, "propose", key="model", value="gpt-tiny"), replay]
    refused = 0
    for req in cases:
        try:
            run.ledger.submit(req)
        except LedgerError:
            refused += int(run.ledger.state.seq == before)
    return refused


async def wait_version(coord: Coordinator, version: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while coord.run.version < version:
        if time.monotonic() > deadline or coord.error is not None:
            raise RuntimeError(f"round {version - 1} did not commit ({coord.error!r})")
        await asyncio.sleep(0.01)


def flood(coord: Coordinator, n: int) -> int:
    """`n` fresh identities say Hello at the socket's pre-Hello check; how many pass."""
    admitted = 0
    for _ in range(n):
        node = BenchNode(coord)
        if _pre_hello_check(coord, node.conn, node.hello(node.conn.challenge)) is None:
            admitted += 1
    return admitted


def tamper(data: bytes, rng: random.Random, trial: int) -> bytes:
    """One random single-byte edit, entry edit, deletion or reordering of an export."""
    lines = data.rstrip(b"\n").split(b"\n")
    kind = trial % 4
    if kind == 0:
        pos = rng.randrange(len(data))
        return data[:pos] + bytes([(data[pos] + rng.randrange(1, 256)) % 256]) + data[pos + 1:]
    if kind == 1:  # edit one entry's field and re-encode it canonically
        i = rng.randrange(len(lines))
        rec = json.loads(lines[i])
        target = rec.get("entry") or rec.get("head") or rec
        key = rng.choice(sorted(k for k in target if k not in ("body",)) or sorted(target))
        value = target[key]
        target[key] = (value + 1 if isinstance(value, int | float) and not isinstance(value, bool)
                       else (value[::-1] if isinstance(value, str) and len(value) > 1
                             else "x"))
        lines[i] = canonical(rec)
    elif kind == 2:
        del lines[rng.randrange(len(lines))]
    else:
        i, j = rng.sample(range(len(lines)), 2)
        lines[i], lines[j] = lines[j], lines[i]
    return b"\n".join(lines) + b"\n"


async def bench(rounds: int, honest: int, flood_n: int, trials: int, seed: int,
                db: str | None = None) -> dict[str, Any]:
    """One run on one backend (`db`: None is SQLite; a postgresql:// URL)."""
    rng = np.random.default_rng(seed)
    tmp = scratch("bench-ledger-")
    run = await asyncio.to_thread(open_run, tmp / "run", {
        "model": "mlp-digits", "quorum": honest, "deadline_s": 10.0, "rounds": rounds,
        "validation": True, "ledger_faucet": 1000, "ledger_min_stake": 100,
        "ledger_pow_bits": 8, "ledger_slash": 50, "resume_grace_s": 0.0}, None, db)
    coord = Coordinator(run)
    nodes = [BenchNode(coord) for _ in range(honest)]
    liars = [BenchNode(coord) for _ in range(3)]  # equivocator, invalid frames, bad updates
    for node in nodes + liars:
        stake(run, node, 100)
    prop = run.ledger.submit(nodes[0].request(run, "propose", key="inner_steps", value=7))
    for node in nodes[: honest // 2 + 1]:
        run.ledger.submit(node.request(run, "vote", proposal=prop["seq"], support=True))
    refused = bad_requests(run, nodes[0], prop["seq"])
    task = asyncio.create_task(coord.run_rounds())
    try:
        for node in nodes + liars:
            await node.join()
        n = run.n_params
        for r in range(rounds):
            while coord.state is None or coord.state.round != r:
                await asyncio.sleep(0.01)
            eq, bad, garbage = liars
            await coord.handle_frame(eq.conn, eq.submit(r, rng.normal(0, 1e-3, n)))
            await coord.handle_frame(eq.conn, eq.submit(r, rng.normal(0, 1e-3, n)))
            await coord.handle_frame(bad.conn, bad.invalid(r, n))
            await coord.handle_frame(bad.conn, bad.submit(r, rng.normal(0, 1e-3, n)))
            await coord.handle_frame(garbage.conn, garbage.submit(r, -30.0 * run.params))
            for node in nodes:
                await coord.handle_frame(node.conn, node.submit(r, rng.normal(0, 1e-3, n)))
            await wait_version(coord, r + 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    admitted = flood(coord, flood_n)
    data = await asyncio.to_thread(run.ledger.export)
    t0 = time.perf_counter()
    state = verify_export(data, server_key=run.identity.public_key if run.identity else None)
    verify_s = time.perf_counter() - t0
    exp = parse_export(data)
    check = evidence_checker(exp.blobs, genesis_key(exp.records))
    unbacked = 0
    for rec in exp.records:
        e = rec["entry"]
        if e["kind"] == "slash":
            try:
                check(e["body"]["evidence"], e["body"]["node"], e["round"], state.run_id)
            except TamperedLedger:
                unbacked += 1
    trng, detected = random.Random(seed), 0
    for i in range(trials):
        bad_data = tamper(data, trng, i)
        try:
            verify_export(bad_data)
        except TamperedLedger:
            detected += 1
        else:
            log.warning("tamper trial %d (kind %d) went undetected", i, i % 4)
    out = {"rounds": run.version, "entries": state.seq + 1, "verify_s": round(verify_s, 3),
           "tamper_trials": trials, "tamper_detected": detected,
           "supply_conserved": state.supply() == state.minted, "supply": state.supply(),
           "slashed": state.slashes, "slash_without_evidence": unbacked,
           "sybil_identities_admitted_without_stake": admitted, "flood": flood_n,
           "refused_requests": f"{refused}/5",
           "governance_applied": run.config.inner_steps == 7,
           "backends": [run.store.db.kind]}
    run.store.close()
    return out


SUMMED = ("rounds", "entries", "tamper_trials", "tamper_detected", "supply", "slashed",
          "slash_without_evidence", "sybil_identities_admitted_without_stake", "flood")


def combine(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures of runs on several backends: counts summed, booleans all, the slowest
    verify_s, and each run's own under `by_backend`."""
    vals = list(runs.values())
    out: dict[str, Any] = {k: sum(int(v[k]) for v in vals) for k in SUMMED}
    out["verify_s"] = max(v["verify_s"] for v in vals)
    out["supply_conserved"] = all(v["supply_conserved"] for v in vals)
    out["governance_applied"] = all(v["governance_applied"] for v in vals)
    refused = [tuple(map(int, v["refused_requests"].split("/"))) for v in vals]
    out["refused_requests"] = f"{sum(r[0] for r in refused)}/{sum(r[1] for r in refused)}"
    out["backends"] = list(runs)
    out["by_backend"] = {name: {k: v for k, v in fig.items() if k != "backends"}
                         for name, fig in runs.items()}
    return out


@contextlib.contextmanager
def postgres(url: str | None) -> Iterator[str | None]:
    """A PostgreSQL URL for the second run: `url` as given, else a fresh schema on a
    throwaway server (stopped afterwards), else None (with the reason logged)."""
    if url:
        yield url
        return
    problem = pgserver.find_problem()
    if problem is not None:
        log.warning("PostgreSQL run skipped: %s", problem)
        yield None
        return
    server = pgserver.Server()
    try:
        yield server.fresh_url()
    finally:
        server.stop()


async def bench_backends(rounds: int, honest: int, flood_n: int, trials: int, seed: int,
                         pg_url: str | None = None) -> dict[str, Any]:
    """The same run on SQLite, then on PostgreSQL (where it can run)."""
    runs = {"sqlite": await bench(rounds, honest, flood_n, trials, seed)}
    with postgres(pg_url) as url:
        if url is not None:
            runs["postgresql"] = await bench(rounds, honest, flood_n, trials, seed, url)
    return combine(runs)


def verify_data_dir(data_dir: Path, db: str | None = None) -> dict[str, Any]:
    """A stopped server's ledger checked offline from its database (bench.chaos): the chain
    (shared.ledger.verify, evidence included) and one reward entry per committed round.
    `db`: the run's database (None: run.sqlite in `data_dir`)."""
    store = Store(data_dir, db)
    try:
        records = store.ledger_records()
        blobs = store.ledger_blobs()
        rounds = [r["round"] for r in store.rounds(limit=10**9)]
    finally:
        store.close()
    try:
        state = verify(records, evidence=evidence_checker(blobs, genesis_key(records)))
    except TamperedLedger as err:
        return {"verified": False, "error": err.message}
    return {"verified": state.supply() == state.minted
            and sorted(state.rewarded_rounds) == rounds,
            "entries": state.seq + 1, "rewarded_rounds": len(state.rewarded_rounds),
            "committed_rounds": len(rounds), "supply_conserved": state.supply() == state.minted}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--honest", type=int, default=4)
    p.add_argument("--flood", type=int, default=1000)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pg-url", default=None,
                   help="PostgreSQL for the second run (default: a throwaway server, where "
                        "PostgreSQL is installed)")
    a = p.parse_args(argv)
    out = asyncio.run(bench_backends(a.rounds, a.honest, a.flood, a.trials, a.seed, a.pg_url))
    for name, fig in out["by_backend"].items():
        print(f"{name:>10}: {fig['rounds']} rounds, {fig['entries']} entries, verified in "
              f"{fig['verify_s']} s; tampering detected {fig['tamper_detected']}/"
              f"{fig['tamper_trials']}; {fig['slashed']} slashes "
              f"({fig['slash_without_evidence']} without evidence); "
              f"{fig['sybil_identities_admitted_without_stake']}/{fig['flood']} unstaked "
              f"identities admitted; supply conserved {fig['supply_conserved']}")
    print(json.dumps(out))
    ok = (out["tamper_detected"] == out["tamper_trials"] and out["supply_conserved"]
          and out["slash_without_evidence"] == 0
          and out["sybil_identities_admitted_without_stake"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
