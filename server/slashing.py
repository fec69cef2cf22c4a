"""Slashing: turns a node's own signed frames into ledger evidence (server.ledger).

The coordinator hands every authenticated frame to `decode` (instead of calling
message_from_frame itself), so that the frames a slash needs are at hand:
- a frame the node signed that the schema refuses -> `invalid_frame`;
- two different signed updates of one node for one round (ConflictingUpdate) ->
  `equivocation` (`conflict`);
- an update validation rejected (an Evidence row with code update_rejected) ->
  `validation_rejected` (`on_evidence`).
Replays are never slashed: anyone who saw a frame can replay it. Only the open round's and
the previous round's update frames are kept, at most two digests per node and round.
"""

from __future__ import annotations

from typing import Any

from server.ledger import LedgerBook
from shared.errors import ProtocolError
from shared.frame import Frame
from shared.messages import Message, Ready, Submit, message_from_frame

MAX_DIGESTS = 2


class Slashing:
    def __init__(self, book: LedgerBook) -> None:
        self.book = book
        self.keys: dict[str, bytes] = {}  # node -> public key (of its latest frame)
        # (node, round) -> {update digest: the signed frame}
        self.frames: dict[tuple[str, int], dict[str, bytes]] = {}
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
        return msg

    def _remember(self, node: str, round_: int, digest: str, data: bytes) -> None:
        if round_ > self.newest:
            self.newest = round_
            self.frames = {k: v for k, v in self.frames.items() if k[1] >= round_ - 1}
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
