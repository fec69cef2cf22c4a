"""Auditing a ledger export offline: the export's line format, slash evidence checks and
`verify_export`, which python -m native_node ledger verify runs. Pure (stdlib + shared).

Export format (GET /api/ledger/export): UTF-8 lines, each one canonical JSON object
(shared.ledger.canonical: a line that is not its own canonical encoding is refused):

    {"entry": {...}, "hash": "...", "sig": "..."}      one per entry, in seq order
    {"evidence": "<sha256 hex>", "data": "<hex>"}       one per evidence frame, sorted by hash
    {"head": {"run_id", "seq", "hash"}, "sig": "..."}   last line: the server's signature
                                                        over HEAD_DOMAIN || canonical(head)

The signed head makes a truncated export (entries deleted at the end) fail as surely as an
edited one.

Slash evidence is what a third party checks with nothing but the export:
- `equivocation`: two frames the node signed (its key `pk` in the evidence) for the same run
  and round, both updates (Submit or Ready), with different update digests;
- `invalid_frame`: a frame the node signed that the message schema refuses;
- `validation_rejected`: the node's signed update frame for the round whose digest
  validation rejected, with the validators' reason (losses and threshold) and who judged;
  re-scoring it needs the round's checkpoint, which the server keeps (docs/ledger.md);
- `p2p_outvoted`: frames [the node's signed Shard result, the server's signed ShardPlan of the
  lowest revision the results were sent under, the one of the revision that judged, then the
  other owners' signed results]: the judging plan names the node and those owners as owners
  of the shard, both plans are of the round and have the same members (members only leave
  within a round, so every result is over the same updates), the results are for that round
  and shard, sent to the server under revisions between the two plans, the others agree on
  one digest, the node's differs, and the others are a strict majority of the shard's owners.
A replayed frame is never slashed: anyone who saw a frame can replay it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from shared.envelope import node_id_of, verify_frame
from shared.errors import ProtocolError
from shared.frame import decode_frame
from shared.ledger import EvidenceCheck, LedgerState, TamperedLedger, canonical, verify
from shared.messages import SERVER, Ready, Shard, ShardPlan, Submit, message_from_frame
from shared.p2p import Plan
from shared.platform import signatures

HEAD_DOMAIN = b"DAAP-LEDGER-HEAD-v1"
MAX_EVIDENCE_PAYLOAD = 1 << 28
UPDATE_TYPES = (Submit.TYPE, Ready.TYPE)


def head_bytes(head: dict[str, Any]) -> bytes:
    return HEAD_DOMAIN + canonical(head)


def genesis_key(records: list[dict[str, Any]]) -> bytes | None:
    """The server key the first record's genesis names (None when it names none); the
    chain's own checks decide whether that genesis holds."""
    try:
        return bytes.fromhex(str(records[0]["entry"]["body"]["server_key"]))
    except (IndexError, KeyError, TypeError, ValueError):
        return None


class _EvidenceCheck:
    """The EvidenceCheck evidence_checker returns."""

    def __init__(self, blobs: dict[str, bytes], server_key: bytes | None) -> None:
        self.blobs, self.server_key = blobs, server_key

    def frame_of(self, ev: dict[str, Any], i: int, node: str, run_id: str,
                 pk_hex: Any = None) -> Any:
        names = ev.get("frames")
        if not isinstance(names, list) or len(names) <= i:
            raise TamperedLedger("evidence names too few frames", field="evidence")
        data = self.blobs.get(names[i])
        if data is None or hashlib.sha256(data).hexdigest() != names[i]:
            raise TamperedLedger(f"evidence frame {names[i]!r} is missing or altered",
                                 field="evidence")
        pk = bytes.fromhex(str(ev.get("pk") if pk_hex is None else pk_hex))
        if node_id_of(pk) != node:
            raise TamperedLedger("evidence key is not the slashed node's", field="evidence")
        frame = decode_frame(data, max_payload=MAX_EVIDENCE_PAYLOAD)
        try:
            verify_frame(frame, public_key=pk, run_id=run_id, node_id=node)
        except ProtocolError as err:
            raise TamperedLedger(f"evidence frame is not signed by the node: {err.message}",
                                 field="evidence") from None
        if frame.header.get("run_id") not in (None, run_id):
            raise TamperedLedger("evidence frame is for another run", field="evidence")
        return frame

    def result_of(self, ev: dict[str, Any], i: int, node: str, run_id: str, pk_hex: Any = None
                  ) -> Shard:
        msg = message_from_frame(self.frame_of(ev, i, node, run_id, pk_hex),
                                 max_payload=MAX_EVIDENCE_PAYLOAD)
        if not (isinstance(msg, Shard) and msg.kind == "result" and msg.to == SERVER
                and msg.node_id == node and msg.round == ev.get("round")
                and msg.shard == ev.get("shard")):
            raise TamperedLedger("p2p evidence frame is not the owner's reduced shard of the "
                                 "stated round and shard", field="evidence")
        return msg

    def plan_of(self, ev: dict[str, Any], i: int, run_id: str) -> tuple[ShardPlan, Plan]:
        if self.server_key is None:
            raise TamperedLedger("p2p evidence needs the server key", field="evidence")
        server = node_id_of(self.server_key)
        msg = message_from_frame(self.frame_of(ev, i, server, run_id, self.server_key.hex()),
                                 max_payload=MAX_EVIDENCE_PAYLOAD)
        if not isinstance(msg, ShardPlan) or msg.round != ev.get("round"):
            raise TamperedLedger("p2p evidence plan is not the server's ShardPlan of the round",
                                 field="evidence")
        try:
            plan = Plan.from_dict(msg.plan)
        except (KeyError, TypeError, ValueError):
            raise TamperedLedger("p2p evidence plan is malformed", field="evidence") from None
        if plan.round != msg.round:
            raise TamperedLedger("p2p evidence plan is for another round", field="evidence")
        return msg, plan

    def check_outvoted(self, ev: dict[str, Any], node: str, run_id: str) -> None:
        keys, shard = ev.get("keys"), ev.get("shard")
        if not isinstance(keys, list) or not keys or not isinstance(shard, int):
            raise TamperedLedger("p2p evidence needs the shard and the other owners' keys",
                                 field="evidence")
        lie = self.result_of(ev, 0, node, run_id)
        (lo_msg, lo), (hi_msg, hi) = self.plan_of(ev, 1, run_id), self.plan_of(ev, 2, run_id)
        if lo.members != hi.members or lo.revision > hi.revision or (
                lo_msg.rule, lo_msg.result_codec, lo_msg.byzantine_fraction) != (
                hi_msg.rule, hi_msg.result_codec, hi_msg.byzantine_fraction) \
                or not 0 <= shard < hi.n_shards:
            raise TamperedLedger("p2p evidence plans are not of one member set",
                                 field="evidence")
        owners = hi.owners[shard]
        others = [node_id_of(bytes.fromhex(str(k))) for k in keys]
        results = [self.result_of(ev, 3 + i, o, run_id, k)
                   for i, (o, k) in enumerate(zip(others, keys, strict=True))]
        digests = {hashlib.sha256(r.payload).digest() for r in results}
        if not (node in owners and set(others) <= set(owners) and node not in others
                and len(set(others)) == len(others) and 2 * len(others) > len(owners)
                and len(digests) == 1
                and hashlib.sha256(lie.payload).digest() not in digests
                and all(lo.revision <= r.revision <= hi.revision for r in (lie, *results))):
            raise TamperedLedger("p2p evidence does not show the node outvoted by a majority "
                                 "of the shard's owners", field="evidence")

    def __call__(self, ev: dict[str, Any], node: str, round_: int | None, run_id: str) -> None:
        kind = ev["kind"]
        if kind == "equivocation":
            a, b = self.frame_of(ev, 0, node, run_id), self.frame_of(ev, 1, node, run_id)
            if not (a.msg_type in UPDATE_TYPES and b.msg_type in UPDATE_TYPES
                    and a.header.get("round") == b.header.get("round")
                    and a.header.get("digest") != b.header.get("digest")):
                raise TamperedLedger("equivocation evidence is not two different updates for "
                                     "one round", field="evidence")
        elif kind == "invalid_frame":
            frame = self.frame_of(ev, 0, node, run_id)
            try:
                message_from_frame(frame, max_payload=MAX_EVIDENCE_PAYLOAD)
            except ProtocolError:
                return
            raise TamperedLedger("invalid_frame evidence is a valid message", field="evidence")
        elif kind == "p2p_outvoted":
            self.check_outvoted(ev, node, run_id)
        elif kind == "validation_rejected":
            frame = self.frame_of(ev, 0, node, run_id)
            if not (frame.msg_type in UPDATE_TYPES
                    and frame.header.get("digest") == ev.get("digest")
                    and frame.header.get("round") == ev.get("round")
                    and isinstance(ev.get("reason"), str) and ev.get("validators")):
                raise TamperedLedger("validation evidence does not match the signed update",
                                     field="evidence")
        else:  # pragma: no cover - LedgerState refuses unknown kinds first
            raise TamperedLedger(f"unknown evidence kind {kind!r}", field="evidence")


def evidence_checker(blobs: dict[str, bytes], server_key: bytes | None = None
                     ) -> EvidenceCheck:
    """An EvidenceCheck over the export's evidence frames (sha256 hex -> bytes). `server_key`
    (the genesis entry's, genesis_key) checks the server's frames some evidence names
    (p2p_outvoted's plans); without it such evidence is refused."""
    return _EvidenceCheck(blobs, server_key)


@dataclass(frozen=True)
class Export:
    records: list[dict[str, Any]]
    blobs: dict[str, bytes]
    head: dict[str, Any]
    head_sig: str


def parse_export(data: bytes) -> Export:
    """Split an export into its records, evidence and signed head; refuses any line that is
    not canonical JSON or not of a known shape."""
    records: list[dict[str, Any]] = []
    blobs: dict[str, bytes] = {}
    head: dict[str, Any] | None = None
    head_sig = ""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, line in enumerate(lines):
        try:
            obj = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise TamperedLedger(f"line {i + 1} is not JSON", field="export") from None
        if not isinstance(obj, dict) or canonical(obj) != line:
            raise TamperedLedger(f"line {i + 1} is not canonical JSON", field="export")
        if head is not None:
            raise TamperedLedger("lines after the signed head", field="export")
        if set(obj) == {"entry", "hash", "sig"}:
            if blobs:
                raise TamperedLedger(f"line {i + 1}: an entry after the evidence",
                                     field="export")
            records.append(obj)
        elif set(obj) == {"evidence", "data"}:
            if blobs and str(obj["evidence"]) <= max(blobs):
                raise TamperedLedger(f"line {i + 1}: evidence out of order (sorted by hash, "
                                     "each once)", field="export")
            try:
                blobs[str(obj["evidence"])] = bytes.fromhex(str(obj["data"]))
            except ValueError:
                raise TamperedLedger(f"line {i + 1}: evidence is not hex",
                                     field="export") from None
        elif set(obj) == {"head", "sig"} and isinstance(obj["head"], dict):
            head, head_sig = obj["head"], str(obj["sig"])
        else:
            raise TamperedLedger(f"line {i + 1} is of no known shape", field="export")
    if head is None:
        raise TamperedLedger("the export has no signed head (truncated?)", field="export")
    return Export(records=records, blobs=blobs, head=head, head_sig=head_sig)


def verify_export(data: bytes, *, server_key: bytes | None = None) -> LedgerState:
    """Check an export end to end: every entry (shared.ledger.verify, with the evidence
    checks) and the signed head (same run, same last seq and hash). Raises TamperedLedger."""
    exp = parse_export(data)
    state = verify(exp.records, server_key=server_key,
                   evidence=evidence_checker(exp.blobs, genesis_key(exp.records)))
    head = exp.head
    if head != {"run_id": state.run_id, "seq": state.seq, "hash": state.head}:
        raise TamperedLedger(f"the signed head {head} is not the chain's last entry "
                             f"(seq {state.seq})", field="head")
    try:
        ok = exp.head_sig == exp.head_sig.lower() and signatures().verify(
            state.server_key, head_bytes(head), bytes.fromhex(exp.head_sig),
            state.run_id.encode("utf-8"))
    except ValueError:
        ok = False
    if not ok:
        raise TamperedLedger("the head's signature does not verify", field="head")
    return state


def summary(state: LedgerState) -> dict[str, Any]:
    """What `ledger verify` prints: entries, supply, minted, balances, stakes."""
    return {"run_id": state.run_id, "entries": state.seq + 1, "head": state.head,
            "minted": state.minted, "supply": state.supply(),
            "supply_conserved": state.supply() == state.minted,
            "rewards": state.rewards, "slashes": state.slashes,
            "balances": dict(sorted(state.balances.items())),
            "stakes": dict(sorted(state.stakes.items())),
            "open_proposals": sorted(state.proposals)}
