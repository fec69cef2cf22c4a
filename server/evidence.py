"""Evidence: the rows of the store's `rejections` table (GET /api/rejections).

Every refusal of a known node (a typed error to its sender, an update validators excluded, a
p2p owner outvoted) leaves a row: round, node, digest, code, reason, and who judged it. The
ledger slashes on these rows. Writing one never stops the server from serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from server.store import Store

log = logging.getLogger("server.coordinator")


class Evidence:
    def __init__(self, store: Store) -> None:
        self.store = store
        # called with every record's arguments (server.slashing reads validation rejections)
        self.listeners: list[Callable[[int | None, str, str | None, str, str, list[str]],
                                      None]] = []

    def record(self, round_: int | None, node_id: str, digest: str | None, code: str,
               reason: str, validators: list[str]) -> None:
        """One rejection row; a failure to write it is logged, not raised."""
        try:
            self.store.record_rejection(round_=round_, node_id=node_id, digest=digest,
                                        code=code, reason=reason, validators=validators)
        except Exception:  # the record is evidence, not a reason to stop serving
            log.exception("could not record a rejection of %s", node_id[:12])
        for listener in self.listeners:
            listener(round_, node_id, digest, code, reason, validators)
