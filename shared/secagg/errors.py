"""Typed secure-aggregation errors (shared.errors.ProtocolError subclasses).

The aggregator raises one of these for a participant's bad input AFTER recording that
participant's exclusion; the round goes on without it (or refuses to unmask: never a wrong sum).
"""

from __future__ import annotations

from shared.errors import BadSignature, BadUpdate, ProtocolError


class SecAggError(ProtocolError):
    """Base of the secure-aggregation errors."""

    code = "secagg_error"


class BadKeyMessage(SecAggError, BadSignature):
    """A key message (advert, ciphertexts, share bundle, unmask response) whose ML-DSA
    signature does not verify, or whose contents are malformed or inconsistent."""

    code = "secagg_bad_key_message"


class NotNeighbour(SecAggError):
    """Ciphertexts or shares addressed to a peer that is not the sender's neighbour in the
    round's graph (or missing for one that is)."""

    code = "secagg_not_neighbour"


class BadShare(SecAggError):
    """A Shamir share that does not match the dealer's commitment, or a reconstructed secret
    that does not match its commitment."""

    code = "secagg_bad_share"


class BadMaskedUpdate(SecAggError, BadUpdate):
    """A masked update of the wrong length, offset or ring, or with a bad digest/signature."""

    code = "secagg_bad_masked_update"


class TooManyDropouts(SecAggError):
    """Fewer than the threshold of a dealer's neighbours answered with valid shares: the sum
    cannot be unmasked (the round must be retried); nothing is returned."""

    code = "secagg_too_many_dropouts"


SECAGG_ERROR_CODES: tuple[str, ...] = tuple(c.code for c in (
    SecAggError, BadKeyMessage, NotNeighbour, BadShare, BadMaskedUpdate, TooManyDropouts))
