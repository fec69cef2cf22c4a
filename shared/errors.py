"""Typed protocol errors.

Every error the protocol raises is a `ProtocolError` with a stable machine-readable `code`
(sent back to the peer in an ERROR frame) and, where it applies, the `field` at fault.
Receivers count rejections by `code`.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every error a peer can be told about."""

    code = "protocol_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" + (f" (field {self.field})" if self.field else "")


class FrameError(ProtocolError):
    """The bytes are not a well-formed frame (bad magic, truncated, inconsistent lengths)."""

    code = "bad_frame"


class FrameTooLarge(FrameError):
    """A declared length exceeds the receiver's limit; nothing beyond the header is read."""

    code = "frame_too_large"


class UnsupportedVersion(FrameError):
    """The frame's protocol version is not one this peer speaks."""

    code = "unsupported_version"


class MessageError(ProtocolError):
    """The frame is well formed but the message inside it is not valid (missing/bad field)."""

    code = "bad_message"


class UnknownNode(ProtocolError):
    """The sender has not joined the run (no hello on this connection)."""

    code = "unknown_node"


class WrongRun(ProtocolError):
    """The message names a different run."""

    code = "wrong_run"


class WrongRound(ProtocolError):
    """The message is for a round that is not open."""

    code = "wrong_round"


class BadUpdate(ProtocolError):
    """The update's payload is unusable (wrong shape, NaN/inf, digest mismatch)."""

    code = "bad_update"


class ConflictingUpdate(ProtocolError):
    """The node already submitted a DIFFERENT update for this round."""

    code = "conflicting_update"


class BadSignature(ProtocolError):
    """The frame is unsigned, or its signature does not verify for the claimed node."""

    code = "bad_signature"


class Replay(ProtocolError):
    """A signed frame whose nonce was already seen from that node."""

    code = "replay"


class UpdateRejected(ProtocolError):
    """Validators found the update worsens held-out loss beyond the run's threshold; it
    was excluded from the round's aggregate and recorded against the sender."""

    code = "update_rejected"


class StaleUpdate(WrongRound):
    """An update for a round that was already committed, refused by the run's stale
    policy ("drop"), or older than its max_staleness ("weight")."""

    code = "stale_update"


class NotAdmitted(ProtocolError):
    """The run admits only identities with stake on its ledger (ledger_min_stake), and
    this one has too little (docs/ledger.md: faucet, stake)."""

    code = "not_admitted"


class BadChunk(BadUpdate):
    """A chunk of a streamed update (shared.stream) whose SHA-256 is not the one its signed
    manifest lists, or whose length or index does not fit the manifest. Dropped; the
    transfer's verified chunks are kept."""

    code = "bad_chunk"


class DuplicateChunk(BadChunk):
    """A chunk of a streamed update that was already received and verified."""

    code = "duplicate_chunk"


class ChunkOutOfWindow(BadChunk):
    """A chunk too far ahead of the first one still missing (beyond the receive window)."""

    code = "chunk_out_of_window"


class ForeignChunk(BadChunk):
    """A chunk naming an update (round, digest) that no open transfer of its sender has."""

    code = "foreign_chunk"


ERROR_CODES: tuple[str, ...] = tuple(
    cls.code
    for cls in (
        ProtocolError,
        FrameError,
        FrameTooLarge,
        UnsupportedVersion,
        MessageError,
        UnknownNode,
        WrongRun,
        WrongRound,
        BadUpdate,
        ConflictingUpdate,
        BadSignature,
        Replay,
        UpdateRejected,
        StaleUpdate,
        NotAdmitted,
        BadChunk,
        DuplicateChunk,
        ChunkOutOfWindow,
        ForeignChunk,
    )
)
