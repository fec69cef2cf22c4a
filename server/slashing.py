"""Slashing: turns a node's own signed frames into ledger evidence (server.ledger).

The coordinator hands every authenticated frame to `decode` (instead of calling
message_from_frame itself), so that the frames a slash needs are at hand:
- a frame the node signed that the schema refuses -> `invalid_frame`;
- two different signed updates of one node for one round (ConflictingUpdate) ->
  `equivocation` (`conflict`);
- an update validation rejected (an Evidence row with code update_rejected) ->
  `validation_rejected` (`on_evidence`);
- a p2p owner outvoted on a shard (server.p2p calls `outvoted`) -> `p2p_outvoted`: the
  owners' signed Shard result frames for that shard (kept here as they arrived) and the
  server's signed ShardPlan frames that named them owners.
Replays are never slashed: anyone who saw a frame can replay it. Only the open round's and
the previous round's update and shard-result frames are kept, at most two digests per node and
round (update) or node, round and shard (result).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from server.ledger import LedgerBook
from shared.errors import ProtocolError
from shared.frame import Frame, decode_frame
from shared.ledger_audit import MAX_EVIDENCE_PAYLOAD, evidence_checker
from shared.messages import SERVER, Message, Ready, Shard, Submit, message_from_frame, sha256_hex

MAX_DIGESTS = 2
log = logging.getLogger("server.ledger")


class Slashing:
    def __init__(self, book: LedgerBook) -> None:
        self.book = book
        self.keys: dict[str, bytes] = {}  # node -> public key (of its latest frame)
        # (node, round) -> {update digest: the signed frame}
        self.frames: dict[tuple[str, int], dict[str, bytes]] = {}
        # (node, round, shard) -> {payload digest: the signed Shard result frame}
        self.results: dict[tuple[str, int, int], dict[str, bytes]] = {}
        self.newest = -1

    def decode(self, frame: Frame, data: bytes, node_id: str, key: bytes,
               max_payload: int) -> Message:
        """message_from_frame; a schema refusal of this signed frame is queued as a slash."""
        self.keys[node_id] = key
        try:
            msg = message_from_frame(frame, max_payload=max_payload)
        except ProtocolError as err:
            self.book.slash(node_id, {"kind": "invalid_frame", "pk": key.hex(),
                                      "reason": f"{err.code}: {err.message}"[:300]}, [data])
            raise
        if isinstance(msg, Submit | Ready):
            self._remember(node_id, msg.round, msg.digest, data)
        elif isinstance(msg, Shard) and msg.kind == "result" and msg.to == SERVER:
            self._remember_result(node_id, msg, data)
        return msg

    def _remember_result(self, node: str, msg: Shard, data: bytes) -> None:
        if msg.round < self.newest - 1:
            return
        held = self.results.setdefault((node, msg.round, msg.shard), {})
        digest = sha256_hex(msg.payload)
        if digest not in held and len(held) < MAX_DIGESTS:
            held[digest] = data

    def _remember(self, node: str, round_: int, digest: str, data: bytes) -> None:
        if round_ > self.newest:
            self.newest = round_
            self.frames = {k: v for k, v in self.frames.items() if k[1] >= round_ - 1}
            self.results = {k: v for k, v in self.results.items() if k[1] >= round_ - 1}
        if round_ < self.newest - 1:
            return
        held = self.frames.setdefault((node, round_), {})
        if digest not in held and len(held) < MAX_DIGESTS:
            held[digest] = data

    def conflict(self, node: str, round_: int | None) -> None:
        """ConflictingUpdate: two signed updates of `node` for `round_` -> equivocation."""
        held = self.frames.get((node, round_), {}) if round_ is not None else {}
        if len(held) >= 2 and node in self.keys:
            self.book.slash(node, {"kind": "equivocation", "pk": self.keys[node].hex(),
                                   "round": round_}, list(held.values())[:2])

    def on_evidence(self, round_: int | None, node: str, digest: str | None, code: str,
                    reason: str, validators: list[str]) -> None:
        """An Evidence row: an update validation rejected is slashed with its frame."""
        if code != "update_rejected" or round_ is None or digest is None:
            return
        data = self.frames.get((node, round_), {}).get(digest)
        if data is not None and node in self.keys:
            ev: dict[str, Any] = {"kind": "validation_rejected", "pk": self.keys[node].hex(),
                                  "round": round_, "digest": digest, "reason": reason[:300],
                                  "validators": list(validators)}
            self.book.slash(node, ev, [data])

    def outvoted(self, round_: int, shard: int, liar: str, majority: str,
                 owners: dict[str, str], plans: dict[int, bytes]) -> bool:
        """A p2p owner outvoted on `shard` (server.p2p): `owners` maps each owner whose result
        counted to its result digest, `majority` is the digest that stood, `plans` the signed
        ShardPlan frames of the round by revision. Queues a `p2p_outvoted` slash with the
        liar's signed result, the majority's and the plans of the lowest and highest revision
        those results were sent under (the same member set: members only leave within a
        round). False when a frame is missing (nothing is slashed)."""
        lie = {d: f for d, f in self.results.get((liar, round_, shard), {}).items()
               if d != majority}
        honest = sorted(o for o, d in owners.items() if d == majority and o != liar)
        got = [self.results.get((o, round_, shard), {}).get(majority) for o in honest]
        agreeing = [f for f in got if f is not None]
        if not lie or liar not in self.keys or len(agreeing) != len(honest) \
                or any(o not in self.keys for o in honest):
            return False
        liar_frame = list(lie.values())[-1]
        results = [liar_frame, *agreeing]
        revisions = [int(decode_frame(f, max_payload=MAX_EVIDENCE_PAYLOAD).header["revision"])
                     for f in results]
        lo, hi = min(revisions), max(plans)
        if lo not in plans:
            return False
        ev: dict[str, Any] = {
            "kind": "p2p_outvoted", "pk": self.keys[liar].hex(), "round": round_,
            "shard": shard, "keys": [self.keys[o].hex() for o in honest],
            "reason": f"reduced shard {shard} of round {round_} differs from {len(honest)} "
                      "other owners' signed results"}
        frames = [liar_frame, plans[lo], plans[hi], *results[1:]]
        blobs = {hashlib.sha256(f).hexdigest(): f for f in frames}
        try:  # what `ledger verify` will check: never write a slash that does not verify
            evidence_checker(blobs, self.book.identity.public_key)(
                {**ev, "frames": [hashlib.sha256(f).hexdigest() for f in frames]}, liar,
                round_, self.book.run_id)
        except ProtocolError as err:  # TamperedLedger, or a frame the schema refuses
            log.warning("p2p evidence against %s does not check: %s", liar[:12], err.message)
            return False
        self.book.slash(liar, ev, frames)
        return True
