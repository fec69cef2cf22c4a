"""The run's ledger: signed, hash-chained entries of stake, rewards, slashes, transfers,
proposals, votes and config changes, and the pure state machine that replays them.

Everything here is pure (stdlib + shared): the server appends entries with it, and anyone who
holds an export checks the whole chain with `verify` (python -m native_node ledger verify).

An entry is a JSON object {seq, prev, kind, round, at, body}. Its hash is
SHA-256(DOMAIN || canonical JSON of the entry); `prev` is the previous entry's hash (64 zeros
for the genesis entry, seq 0). The server signs the 32 hash bytes with its ML-DSA-65 key, the
run id as the context string. The genesis entry names the server key and the run's rules
(the minting rule among them), so a verifier needs nothing else, and may pin the key.

Amounts are integers (units). Supply is conserved: only `reward` (at most
rules.reward_per_round per committed round) and `faucet` (rules.faucet once per identity)
mint, and every other entry moves units between accounts (a slash moves stake to TREASURY).
So sum(balances) + sum(stakes) == minted after every entry.

Requests a participant makes (faucet, stake, transfer, propose, vote) are carried in the entry
as the participant signed them: {op, run_id, node, pk, nonce, ...} plus `sig`, an ML-DSA-65
signature over REQUEST_DOMAIN || canonical JSON of the request without `sig`. The request's
nonce must be the account's next one (a replayed request is refused).

A proposal that has not passed after rules.proposal_rounds committed rounds (counted by the
rounds rewarded since it was made; 0 or absent: never) is closed by an `expire` entry in the
batch of the round that makes it due.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shared.errors import ProtocolError
from shared.platform import signatures

DOMAIN = b"DAAP-LEDGER-v1"
REQUEST_DOMAIN = b"DAAP-LEDGER-REQ-v1"
GENESIS_PREV = "0" * 64
TREASURY = "treasury"  # the account slashed stake goes to
REQUEST_OPS = ("faucet", "stake", "transfer", "propose", "vote")
EVIDENCE_KINDS = ("equivocation", "invalid_frame", "validation_rejected", "p2p_outvoted")
MAX_AMOUNT = 2**53  # amounts stay exact in every JSON reader (the tab's too)


class LedgerError(ProtocolError):
    """A ledger request or entry that cannot be applied; nothing is written."""

    code = "ledger_error"


class BadRequestSignature(LedgerError):
    code = "bad_signature"


class InsufficientBalance(LedgerError):
    code = "insufficient_balance"


class UnknownSetting(LedgerError):
    code = "unknown_setting"


class FixedSetting(LedgerError):
    code = "fixed_setting"


class ReplayedRequest(LedgerError):
    code = "replay"


class TamperedLedger(LedgerError):
    """The chain does not verify: hash, signature, order or the replayed state is wrong."""

    code = "tampered"


def canonical(obj: Any) -> bytes:
    """The one JSON encoding the ledger hashes and signs: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(DOMAIN + canonical(entry)).hexdigest()


def request_bytes(request: dict[str, Any]) -> bytes:
    """What a participant signs for a request (every field but `sig`)."""
    return REQUEST_DOMAIN + canonical({k: v for k, v in request.items() if k != "sig"})


def pow_ok(run_id: str, node_id: str, pow_nonce: int, bits: int) -> bool:
    """Proof of work of a new identity: SHA-256(run_id:node_id:nonce) has `bits` leading
    zero bits."""
    if bits <= 0:
        return True
    digest = hashlib.sha256(f"{run_id}:{node_id}:{pow_nonce}".encode()).digest()
    return int.from_bytes(digest, "big") >> (256 - bits) == 0


def solve_pow(run_id: str, node_id: str, bits: int) -> int:
    """The smallest nonce that satisfies pow_ok (about 2**bits hashes)."""
    n = 0
    while not pow_ok(run_id, node_id, n, bits):
        n += 1
    return n


def sign_request(request: dict[str, Any], *, secret_key: bytes) -> dict[str, Any]:
    """`request` with its `sig` (the participant's ML-DSA-65 key, run id as context)."""
    sig = signatures().sign(secret_key, request_bytes(request),
                            str(request["run_id"]).encode("utf-8"))
    return {**request, "sig": sig.hex()}


def reward_shares(pool: int, basis: list[list[Any]]) -> list[list[Any]]:
    """The reward rule: `pool` split in proportion to each node's weight (floor; the
    remainder is not minted). `basis` is [[node, weight], ...], weights integers >= 0."""
    total = sum(int(w) for _, w in basis)
    if total <= 0:
        return []
    return [[n, pool * int(w) // total] for n, w in basis if pool * int(w) // total > 0]


EvidenceCheck = Callable[[dict[str, Any], str, int | None, str], None]


@dataclass
class LedgerState:
    """The state the entries so far imply. `apply` checks one entry against it."""

    run_id: str = ""
    server_key: bytes = b""
    rules: dict[str, Any] = field(default_factory=dict)
    balances: dict[str, int] = field(default_factory=dict)
    stakes: dict[str, int] = field(default_factory=dict)
    nonces: dict[str, int] = field(default_factory=dict)  # next request nonce per account
    keys: dict[str, str] = field(default_factory=dict)  # node -> public key hex
    fauceted: set[str] = field(default_factory=set)
    proposals: dict[int, dict[str, Any]] = field(default_factory=dict)  # seq -> open proposal
    closed: dict[int, dict[str, Any]] = field(default_factory=dict)
    rewarded_rounds: set[int] = field(default_factory=set)
    minted: int = 0
    seq: int = -1
    head: str = GENESIS_PREV
    slashes: int = 0
    rewards: int = 0

    # -- reading ---------------------------------------------------------------------------
    def supply(self) -> int:
        return sum(self.balances.values()) + sum(self.stakes.values())

    def total_stake(self) -> int:
        return sum(self.stakes.values())

    def tally(self, seq: int) -> tuple[int, int]:
        """(stake voting yes, stake voting no) on proposal `seq`, by current stake."""
        votes = self.proposals[seq]["votes"]
        yes = sum(self.stakes.get(n, 0) for n, s in votes.items() if s)
        no = sum(self.stakes.get(n, 0) for n, s in votes.items() if not s)
        return yes, no

    def passing(self) -> list[int]:
        """Open proposals with more than half of all stake voting yes, oldest first."""
        total = self.total_stake()
        return [s for s in sorted(self.proposals) if total > 0 and 2 * self.tally(s)[0] > total]

    def expires_after(self, seq: int) -> int | None:
        """The committed round whose commit expires proposal `seq` unless it passes first
        (None: proposals never expire in this run)."""
        ttl = int(self.rules.get("proposal_rounds", 0))
        return self.proposals[seq]["opened"] + ttl - 1 if ttl > 0 else None

    def expiring(self) -> list[int]:
        """Open proposals that are due (rules.proposal_rounds committed rounds old) and do not
        pass, oldest first."""
        ttl = int(self.rules.get("proposal_rounds", 0))
        passing = set(self.passing())
        return [s for s in sorted(self.proposals) if ttl > 0 and s not in passing
                and len(self.rewarded_rounds) - self.proposals[s]["opened"] >= ttl]

    # -- requests --------------------------------------------------------------------------
    def check_request(self, req: dict[str, Any]) -> str:
        """A participant's signed request is well formed, signed by its node's key and not a
        replay; returns the node id. Raises a LedgerError naming the field."""
        op = req.get("op")
        if op not in REQUEST_OPS:
            raise LedgerError(f"op must be one of {REQUEST_OPS}", field="op")
        if req.get("run_id") != self.run_id:
            raise LedgerError("request is for another run", field="run_id")
        node, pk_hex, sig_hex, nonce = req.get("node"), req.get("pk"), req.get("sig"), \
            req.get("nonce")
        if not (isinstance(node, str) and isinstance(pk_hex, str) and isinstance(sig_hex, str)):
            raise LedgerError("request needs node, pk and sig strings", field="node")
        try:
            pk, sig = bytes.fromhex(pk_hex), bytes.fromhex(sig_hex)
        except ValueError:
            raise BadRequestSignature("pk and sig must be hex", field="sig") from None
        if hashlib.sha256(pk).hexdigest() != node:
            raise BadRequestSignature("node is not the SHA-256 of pk", field="node")
        if not signatures().verify(pk, request_bytes(req), sig, self.run_id.encode("utf-8")):
            raise BadRequestSignature("request signature does not verify", field="sig")
        if not isinstance(nonce, int) or isinstance(nonce, bool) or nonce < 0:
            raise LedgerError("nonce must be an integer >= 0", field="nonce")
        if nonce != self.nonces.get(node, 0):
            raise ReplayedRequest(f"nonce {nonce} is not this account's next "
                                  f"({self.nonces.get(node, 0)}): a replayed or reordered "
                                  "request", field="nonce")
        return node

    @staticmethod
    def _amount(req: dict[str, Any]) -> int:
        amount = req.get("amount")
        if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= MAX_AMOUNT:
            raise LedgerError(f"amount must be an integer in [1, {MAX_AMOUNT}]", field="amount")
        return amount

    def _take(self, node: str, amount: int) -> None:
        if self.balances.get(node, 0) < amount:
            raise InsufficientBalance(f"balance {self.balances.get(node, 0)} < {amount}",
                                      field="amount")
        self.balances[node] -= amount

    def _give(self, node: str, amount: int) -> None:
        self.balances[node] = self.balances.get(node, 0) + amount

    def apply_request(self, req: dict[str, Any], seq: int,
                      check_setting: Callable[[str, Any], None] | None = None) -> None:
        node = self.check_request(req)
        op = req["op"]
        if op == "faucet":
            self._faucet(node, req)
        elif op in ("stake", "transfer"):
            amount = self._amount(req)
            to = node if op == "stake" else req.get("to")
            if op == "transfer" and (not isinstance(to, str) or len(to) != 64 or to == node):
                raise LedgerError("to must be another node id (64 hex)", field="to")
            self._take(node, amount)
            if op == "stake":
                self.stakes[node] = self.stakes.get(node, 0) + amount
            else:
                self._give(str(to), amount)
        elif op == "propose":
            self._propose(node, req, seq, check_setting)
        elif op == "vote":
            self._vote(node, req)
        self.nonces[node] = req["nonce"] + 1
        self.keys[node] = req["pk"]

    def _faucet(self, node: str, req: dict[str, Any]) -> None:
        amount = int(self.rules.get("faucet", 0))
        if amount <= 0:
            raise LedgerError("this run has no faucet", field="op")
        if node in self.fauceted:
            raise LedgerError("this identity already used the faucet", field="node")
        pow_nonce = req.get("pow")
        if not isinstance(pow_nonce, int) or not pow_ok(
                self.run_id, node, pow_nonce, int(self.rules.get("pow_bits", 0))):
            raise LedgerError(f"proof of work does not have {self.rules.get('pow_bits')} "
                              "leading zero bits", field="pow")
        self.fauceted.add(node)
        self._give(node, amount)
        self.minted += amount

    def _propose(self, node: str, req: dict[str, Any], seq: int,
                 check_setting: Callable[[str, Any], None] | None) -> None:
        key = req.get("key")
        if not isinstance(key, str) or key not in self.rules.get("governable", []):
            if isinstance(key, str) and key in self.rules.get("fixed", []):
                raise FixedSetting(f"{key!r} is fixed for this run", field="key")
            raise UnknownSetting(f"{key!r} is not a setting proposals may change "
                                 f"(governable: {self.rules.get('governable')})", field="key")
        if check_setting is not None:
            check_setting(key, req.get("value"))
        if self.stakes.get(node, 0) <= 0:
            raise InsufficientBalance("only staked nodes propose", field="node")
        self.proposals[seq] = {"seq": seq, "key": key, "value": req.get("value"), "by": node,
                               "votes": {}, "opened": len(self.rewarded_rounds)}

    def _vote(self, node: str, req: dict[str, Any]) -> None:
        prop, support = req.get("proposal"), req.get("support")
        if not isinstance(prop, int) or prop not in self.proposals:
            raise LedgerError(f"no open proposal {prop!r}", field="proposal")
        if not isinstance(support, bool):
            raise LedgerError("support must be true or false", field="support")
        if self.stakes.get(node, 0) <= 0:
            raise InsufficientBalance("only staked nodes vote", field="node")
        if node in self.proposals[prop]["votes"]:
            raise ReplayedRequest("this node already voted on this proposal", field="proposal")
        self.proposals[prop]["votes"][node] = support

    # -- entries ---------------------------------------------------------------------------
    def apply(self, entry: dict[str, Any], *, evidence: EvidenceCheck | None = None,
              check_setting: Callable[[str, Any], None] | None = None) -> None:
        """Apply one entry's effect (the chain fields are checked by `verify`/`Ledger`)."""
        kind, body, round_ = entry["kind"], entry["body"], entry.get("round")
        if kind == "genesis":
            if self.seq != -1:
                raise TamperedLedger("genesis must be the first entry", field="kind")
            self.run_id, self.rules = body["run_id"], dict(body["rules"])
            self.server_key = bytes.fromhex(body["server_key"])
        elif kind == "request":
            self.apply_request(body["request"], entry["seq"], check_setting)
        elif kind == "reward":
            self._apply_reward(body, round_)
        elif kind == "slash":
            self._apply_slash(body, round_, evidence)
        elif kind == "config":
            self._apply_config(body)
        elif kind == "expire":
            self._apply_expire(body)
        else:
            raise TamperedLedger(f"unknown entry kind {kind!r}", field="kind")

    def _apply_reward(self, body: dict[str, Any], round_: int | None) -> None:
        if not isinstance(round_, int) or round_ in self.rewarded_rounds:
            raise TamperedLedger(f"round {round_} rewarded twice or without a round",
                                 field="round")
        pool = int(self.rules.get("reward_per_round", 0))
        if body["pool"] != pool or body["shares"] != reward_shares(pool, body["basis"]):
            raise TamperedLedger("reward shares do not follow the minting rule", field="shares")
        self.rewarded_rounds.add(round_)
        for node, amount in body["shares"]:
            self._give(node, int(amount))
            self.minted += int(amount)
        self.rewards += 1

    def slash_amount(self, node: str) -> int:
        """The slashing rule: rules.slash units, at most what the node holds."""
        held = self.stakes.get(node, 0) + self.balances.get(node, 0)
        return min(int(self.rules.get("slash", 0)), held)

    def _apply_slash(self, body: dict[str, Any], round_: int | None,
                     evidence: EvidenceCheck | None) -> None:
        node, ev = body.get("node"), body.get("evidence")
        if not isinstance(node, str) or not isinstance(ev, dict) \
                or ev.get("kind") not in EVIDENCE_KINDS:
            raise TamperedLedger("a slash must name its node and carry evidence of a known "
                                 f"kind {EVIDENCE_KINDS}", field="evidence")
        if evidence is not None:
            evidence(ev, node, round_, self.run_id)
        amount = self.slash_amount(node)
        if body.get("amount") != amount:
            raise TamperedLedger(f"slash amount {body.get('amount')} != rule {amount}",
                                 field="amount")
        from_stake = min(amount, self.stakes.get(node, 0))
        if from_stake:
            self.stakes[node] -= from_stake
        if amount - from_stake:
            self.balances[node] -= amount - from_stake
        self._give(TREASURY, amount)
        self.slashes += 1

    def _apply_config(self, body: dict[str, Any]) -> None:
        seq = body.get("proposal")
        if not isinstance(seq, int) or seq not in self.passing():
            raise TamperedLedger(f"proposal {seq} is not open with a stake majority",
                                 field="proposal")
        prop = self.proposals.pop(seq)
        if body.get("key") != prop["key"] or body.get("value") != prop["value"]:
            raise TamperedLedger("config change differs from its proposal", field="value")
        self.closed[seq] = prop

    def _apply_expire(self, body: dict[str, Any]) -> None:
        seq = body.get("proposal")
        if not isinstance(seq, int) or seq not in self.expiring():
            raise TamperedLedger(f"proposal {seq} is not open and due to expire",
                                 field="proposal")
        self.closed[seq] = {**self.proposals.pop(seq), "expired": True}


def verify(records: Iterable[dict[str, Any]], *, server_key: bytes | None = None,
           evidence: EvidenceCheck | None = None) -> LedgerState:
    """Check a whole chain: each record {entry, hash, sig} in order, hash, link, seq, the
    server's signature and the replayed state (request signatures, nonces, balances, the
    minting rule, slash evidence via `evidence`). Raises TamperedLedger naming the entry."""
    state = LedgerState()
    for rec in records:
        entry, seq = rec.get("entry"), state.seq + 1
        if not isinstance(entry, dict):
            raise TamperedLedger(f"record {seq} holds no entry", field="entry")
        try:
            if entry.get("seq") != seq:
                raise TamperedLedger(f"seq {entry.get('seq')} where {seq} was due", field="seq")
            if entry.get("prev") != state.head:
                raise TamperedLedger("prev is not the previous entry's hash", field="prev")
            digest = entry_hash(entry)
            if rec.get("hash") != digest:
                raise TamperedLedger("hash does not match the entry", field="hash")
            if seq == 0 and entry.get("kind") != "genesis":
                raise TamperedLedger("the first entry must be the genesis", field="kind")
            if seq == 0:
                key = bytes.fromhex(entry["body"]["server_key"])
                if server_key is not None and key != server_key:
                    raise TamperedLedger("genesis names another server key than the pinned "
                                         "one", field="server_key")
                run_id = entry["body"]["run_id"]
            else:
                key, run_id = state.server_key, state.run_id
            sig = rec.get("sig")
            if not isinstance(sig, str) or not signatures().verify(
                    key, bytes.fromhex(digest), bytes.fromhex(sig), run_id.encode("utf-8")):
                raise TamperedLedger("server signature does not verify", field="sig")
            if not isinstance(sig, str) or sig != sig.lower():
                raise TamperedLedger("sig must be lowercase hex", field="sig")
            state.apply(entry, evidence=evidence)
            if state.supply() != state.minted or any(
                    v < 0 for v in (*state.balances.values(), *state.stakes.values())):
                raise TamperedLedger("supply is not conserved", field="body")
        except TamperedLedger as err:
            raise TamperedLedger(f"entry {seq}: {err.message}", field=err.field) from None
        except ProtocolError as err:
            raise TamperedLedger(f"entry {seq}: {err.code}: {err.message}",
                                 field=err.field) from None
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise TamperedLedger(f"entry {seq} is malformed: {err!r}", field="entry") from None
        state.seq, state.head = seq, digest
    return state
