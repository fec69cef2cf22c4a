"""The server's side of the ledger (shared.ledger): it appends signed, chained entries and
keeps the state they imply.

- A round's entries (its slashes, its reward, the config changes that passed) are built and
  inserted INSIDE the store transaction that commits the round (Store.commit_round calls
  `round_batch`), so a crash never leaves a round without its entries or the other way round.
  The in-memory state advances only after that transaction committed (`LedgerBatch.done`).
- A participant's request (faucet, stake, transfer, propose, vote) is checked against a copy
  of the state and appended in its own transaction (`submit`): a refused request is a typed
  shared.ledger.LedgerError and writes nothing.
- Every append holds the store's lock, so the chain has one writer.

Admission (`admits`): with `ledger_min_stake` > 0 only identities with that much stake are
welcomed; the socket checks it right after the Hello's signature (server/ws.py), and refuses
with a cached pre-signed Error.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.config import FIXED_KEYS, RunConfig
from server.store import Store, UpdateRow
from shared.envelope import Identity
from shared.ledger import (
    GENESIS_PREV,
    FixedSetting,
    LedgerError,
    LedgerState,
    UnknownSetting,
    canonical,
    entry_hash,
    reward_shares,
)
from shared.ledger_audit import head_bytes
from shared.platform import signatures

log = logging.getLogger("server.ledger")

# settings a stake-weighted proposal may change, applied at a round boundary; they are read
# afresh every round. The codec is not among them: nodes learn it once, in their Welcome.
GOVERNABLE = ("inner_steps", "inner_lr", "batch_size", "outer_lr", "outer_momentum",
              "aggregator", "quorum", "deadline_s", "validation_threshold")
LEDGER_KEYS = ("ledger_reward_per_round", "ledger_faucet", "ledger_min_stake",
               "ledger_pow_bits", "ledger_slash", "ledger_proposal_rounds")


def rules_of(config: RunConfig) -> dict[str, Any]:
    """The rules the genesis entry fixes for the whole run (the minting rule among them)."""
    fixed = sorted(set(FIXED_KEYS) | set(LEDGER_KEYS) | {"codec"})
    return {"reward_per_round": config.ledger_reward_per_round,
            "faucet": config.ledger_faucet, "min_stake": config.ledger_min_stake,
            "pow_bits": config.ledger_pow_bits, "slash": config.ledger_slash,
            "proposal_rounds": config.ledger_proposal_rounds,
            "reward_basis": "samples of each accepted update", "governable": list(GOVERNABLE),
            "fixed": fixed}


def check_setting(config: RunConfig) -> Callable[[str, Any], None]:
    """A proposal's value must make a valid config (RunConfig's own checks)."""

    def check(key: str, value: Any) -> None:
        if key in FIXED_KEYS or key in LEDGER_KEYS or key == "codec":
            raise FixedSetting(f"{key!r} is fixed for this run", field="key")
        if key not in GOVERNABLE:
            raise UnknownSetting(f"{key!r} is not a governable setting", field="key")
        try:
            RunConfig.from_dict({**config.to_dict(), key: value})
        except (TypeError, ValueError) as exc:
            raise LedgerError(f"value {value!r} for {key}: {exc}", field="value") from None

    return check


@dataclass
class LedgerBatch:
    """Entries to insert in one transaction, and the state they lead to."""

    rows: list[tuple[int, str, str, int | None, str, str]]  # seq, hash, kind, round, entry, sig
    blobs: dict[str, bytes]
    state: LedgerState
    changes: list[tuple[str, Any]] = field(default_factory=list)  # config changes to apply


@dataclass
class PendingSlash:
    node: str
    evidence: dict[str, Any]
    blobs: dict[str, bytes]


class LedgerBook:
    def __init__(self, store: Store, identity: Identity, run_id: str, config: RunConfig) -> None:
        self.store, self.identity, self.run_id, self.config = store, identity, run_id, config
        self.state = LedgerState()
        self.pending: dict[tuple[str, str], PendingSlash] = {}  # (node, evidence kind) -> slash
        self.on_config: list[Callable[[str, Any], None]] = []
        with store.lock:
            records = store.ledger_records()
            if not records:
                batch = self._batch(self.state, [("genesis", None, {
                    "run_id": run_id, "server_key": identity.public_key.hex(),
                    "rules": rules_of(config), "created_at": time.time()})])
                store.append_ledger(batch)
                self.state = batch.state
            else:
                for rec in records:
                    self.state.apply(rec["entry"])
                    self.state.seq, self.state.head = rec["entry"]["seq"], rec["hash"]
        log.info("ledger: %d entries, supply %d", self.state.seq + 1, self.state.supply())

    # -- building entries ----------------------------------------------------------------
    def _sign(self, digest: str) -> str:
        return signatures().sign(self.identity.secret_key, bytes.fromhex(digest),
                                 self.run_id.encode("utf-8")).hex()

    def _batch(self, base: LedgerState, items: list[tuple[str, int | None, dict[str, Any]]],
               blobs: dict[str, bytes] | None = None) -> LedgerBatch:
        """Apply `items` to a copy of `base`, chaining and signing each; LedgerError if one
        does not apply (then nothing of the batch is kept)."""
        state = copy.deepcopy(base)
        batch = LedgerBatch(rows=[], blobs=dict(blobs or {}), state=state)
        for kind, round_, body in items:
            entry: dict[str, Any] = {"seq": state.seq + 1, "prev": state.head if state.seq >= 0 else
                     GENESIS_PREV, "kind": kind, "round": round_, "at": time.time(),
                     "body": body}
            state.apply(entry, check_setting=check_setting(self.config))
            digest = entry_hash(entry)
            batch.rows.append((entry["seq"], digest, kind, round_, canonical(entry).decode(),
                               self._sign(digest)))
            state.seq, state.head = entry["seq"], digest
            if kind == "config":
                batch.changes.append((body["key"], body["value"]))
        return batch

    def round_batch(self, round_: int, rows: list[UpdateRow]) -> LedgerBatch:
        """The committed round's entries: pending slashes, the reward, passing proposals,
        proposals that are due and did not pass (expire)."""
        items: list[tuple[str, int | None, dict[str, Any]]] = []
        blobs: dict[str, bytes] = {}
        trial = copy.deepcopy(self.state)
        for slash in self.pending.values():
            amount = trial.slash_amount(slash.node)
            items.append(("slash", round_, {"node": slash.node, "amount": amount,
                                            "evidence": slash.evidence}))
            trial.apply({"kind": "slash", "round": round_, "body": items[-1][2]})
            blobs.update(slash.blobs)
        slashed = {s.node for s in self.pending.values()}  # no reward for a slashed update
        basis = [[r.node_id, max(0, int(r.samples))]
                 for r in sorted(rows, key=lambda r: r.node_id) if r.node_id not in slashed]
        pool = self.state.rules["reward_per_round"]
        items.append(("reward", round_, {"pool": pool, "basis": basis,
                                         "shares": reward_shares(pool, basis)}))
        trial.apply({"kind": "reward", "round": round_, "body": items[-1][2]})
        for seq in trial.passing():
            prop = trial.proposals[seq]
            yes, _ = trial.tally(seq)
            items.append(("config", round_, {"proposal": seq, "key": prop["key"],
                                             "value": prop["value"], "yes": yes,
                                             "total_stake": trial.total_stake()}))
            trial.apply({"kind": "config", "round": round_, "body": items[-1][2]})
        for seq in trial.expiring():
            prop = trial.proposals[seq]
            yes, no = trial.tally(seq)
            items.append(("expire", round_, {"proposal": seq, "key": prop["key"],
                                             "value": prop["value"], "yes": yes, "no": no,
                                             "total_stake": trial.total_stake()}))
        return self._batch(self.state, items, blobs)

    def done(self, batch: LedgerBatch) -> None:
        """`batch` is committed: its state is the ledger's; its config changes apply now."""
        self.state = batch.state
        if any(kind == "slash" for _, _, kind, _, _, _ in batch.rows):
            self.pending.clear()
        for key, value in batch.changes:
            log.info("ledger: proposal passed, %s = %r from the next round", key, value)
            for hook in self.on_config:
                hook(key, value)

    # -- requests ------------------------------------------------------------------------
    def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """Append a participant's signed request; its record, or a LedgerError (nothing
        written)."""
        if not isinstance(request, dict):
            raise LedgerError("a request is a JSON object", field="request")
        with self.store.lock:
            batch = self._batch(self.state, [("request", None, {"request": request})])
            self.store.append_ledger(batch)
            self.done(batch)
            seq, digest, _, _, entry, sig = batch.rows[0]
        return {"seq": seq, "hash": digest, "entry": entry, "sig": sig}

    # -- slashing ------------------------------------------------------------------------
    def slash(self, node: str, evidence: dict[str, Any], frames: list[bytes]) -> None:
        """Queue a slash of `node` for the next committed round (one per node and evidence
        kind per round). `frames` are the signed frames the evidence names."""
        names = [hashlib.sha256(f).hexdigest() for f in frames]
        key = (node, str(evidence["kind"]))
        if key not in self.pending:
            self.pending[key] = PendingSlash(node=node, evidence={**evidence, "frames": names},
                                             blobs=dict(zip(names, frames, strict=True)))
            log.warning("ledger: %s will be slashed (%s) at the next commit", node[:12],
                        evidence["kind"])

    # -- reading -------------------------------------------------------------------------
    def admits(self, node_id: str) -> bool:
        need = int(self.state.rules.get("min_stake", 0))
        return need <= 0 or self.state.stakes.get(node_id, 0) >= need

    def export(self) -> bytes:
        """The whole ledger in the export format (shared.ledger_audit), with a signed head."""
        with self.store.lock:
            records = self.store.ledger_records()
            blobs = self.store.ledger_blobs()
            head = {"run_id": self.run_id, "seq": self.state.seq, "hash": self.state.head}
        lines = [canonical({"entry": r["entry"], "hash": r["hash"], "sig": r["sig"]})
                 for r in records]
        lines += [canonical({"evidence": h, "data": d.hex()}) for h, d in sorted(blobs.items())]
        sig = signatures().sign(self.identity.secret_key, head_bytes(head),
                                self.run_id.encode("utf-8")).hex()
        lines.append(canonical({"head": head, "sig": sig}))
        return b"\n".join(lines) + b"\n"

    def account(self, node_id: str) -> dict[str, Any]:
        """What the page shows a participant: balance, stake, rewards and slashes."""
        with self.store.lock:
            records = self.store.ledger_records()
        rewards, slashes = [], []
        for rec in records:
            e = rec["entry"]
            if e["kind"] == "reward":
                amount = dict((n, a) for n, a in e["body"]["shares"]).get(node_id)
                if amount:
                    rewards.append({"round": e["round"], "amount": amount, "seq": e["seq"]})
            elif e["kind"] == "slash" and e["body"]["node"] == node_id:
                ev = e["body"]["evidence"]
                slashes.append({"round": e["round"], "amount": e["body"]["amount"],
                                "seq": e["seq"], "evidence": ev["kind"],
                                "reason": ev.get("reason", ev["kind"])})
        st = self.state
        return {"node_id": node_id, "balance": st.balances.get(node_id, 0),
                "stake": st.stakes.get(node_id, 0), "nonce": st.nonces.get(node_id, 0),
                "admitted": self.admits(node_id), "rewards": rewards, "slashes": slashes}

    def view(self) -> dict[str, Any]:
        st = self.state
        props = []
        for seq, p in sorted(st.proposals.items()):
            yes, no = st.tally(seq)
            props.append({"seq": seq, "key": p["key"], "value": p["value"], "by": p["by"],
                          "yes": yes, "no": no, "total_stake": st.total_stake(),
                          "expires_after_round": st.expires_after(seq)})
        return {"run_id": self.run_id, "entries": st.seq + 1, "head": st.head,
                "supply": st.supply(), "minted": st.minted, "rules": st.rules,
                "total_stake": st.total_stake(), "open_proposals": props,
                "server_key": self.identity.public_key.hex()}


def apply_setting(config: RunConfig, key: str, value: Any) -> None:
    """Change `key` in the run's one RunConfig object in place (every collaborator holds that
    object and reads it afresh each round), after RunConfig's own checks."""
    checked = dataclasses.replace(config, **{key: value})
    object.__setattr__(config, key, getattr(checked, key))
