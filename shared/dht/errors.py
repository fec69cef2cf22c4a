"""Typed refusals of peer records (shared.errors' hierarchy, DHT-local codes).

A record is refused with one of these, never silently dropped: the node counts refusals by
`code` (DhtNode.refused). The codes are not in shared.errors.ERROR_CODES (the vocabulary of
the coordinator's Error frame) because a DHT refusal is never sent to the peer as an Error:
a node that hears a bad record ignores it and counts it.
"""

from __future__ import annotations

from shared.errors import BadSignature, MessageError, ProtocolError


class RecordError(ProtocolError):
    """Base of every refusal of a peer record."""

    code = "bad_record"


class MalformedRecord(RecordError, MessageError):
    """A field of the record is missing, of the wrong type or out of range."""

    code = "bad_record"


class ForgedRecord(RecordError, BadSignature):
    """The signature does not verify for the record's public key, or the node id is not the
    SHA-256 of that key."""

    code = "forged_record"


class ExpiredRecord(RecordError):
    """The record's expiry has passed (or lies further ahead than any honest node signs)."""

    code = "expired_record"


class StaleRecord(RecordError):
    """A record older than the one already held for that node (lower seq), or a different
    record under the same seq (the first verified one stands)."""

    code = "stale_record"


RECORD_ERROR_CODES: tuple[str, ...] = tuple(
    cls.code for cls in (RecordError, ForgedRecord, ExpiredRecord, StaleRecord))
