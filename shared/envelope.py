"""Signed envelopes: who sent a frame, for which run and round, and that nobody replayed it.

Every frame is SIGNED (shared.frame trailer): a node's with its ML-DSA-65 key, the server's
with its own (presented in the Challenge). Pure mode, the run id as the ML-DSA context
string. The signed message is this canonical byte string:

    offset  size  field
    0       11    domain       ASCII "DAAP-SIG-v1"
    11      2     run_len      u16 LE, length of run_id
    13      n     run_id       UTF-8
    13+n    8     round        i64 LE (the header's round; -1 when it has none, or null)
    21+n    32    signer id    32 raw bytes: SHA-256 of the signer's public key
    53+n    1     msg_type     message type id
    54+n    32    digest       SHA-256 of the frame as sent, up to (not including) the
                               signature trailer: fixed header, JSON header, payload
    86+n    1     nonce_len    length of the nonce (16)
    87+n    16    nonce        random bytes, hex in the header's `nonce` field

The receiver verifies the signature BEFORE it inflates or decodes the payload, and refuses a
nonce it has already seen from that node (a replay), or a round that is not open.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from shared.errors import BadSignature, MessageError, Replay
from shared.frame import Frame
from shared.messages import new_nonce
from shared.platform import signatures

DOMAIN = b"DAAP-SIG-v1"
NONCE_LEN = 16
__all__ = ["Identity", "ReplayGuard", "new_nonce", "node_id_of", "sign_round", "signing_bytes",
           "verify_frame"]
NONCE_RE = re.compile(r"[0-9a-f]{32}")


def sign_round(round_: int | None) -> int:
    """The round a frame is signed for: its header's `round`, or -1 when it has none."""
    return round_ if isinstance(round_, int) and not isinstance(round_, bool) else -1


def node_id_of(public_key: bytes) -> str:
    """Node id = SHA-256 of the ML-DSA-65 public key, hex."""
    return hashlib.sha256(public_key).hexdigest()


def signing_bytes(*, run_id: str, round_: int, node_id: str, msg_type: int, digest: bytes,
                  nonce: str) -> bytes:
    run = run_id.encode("utf-8")
    nonce_raw = bytes.fromhex(nonce)
    return b"".join((DOMAIN, struct.pack("<H", len(run)), run, struct.pack("<q", round_),
                     bytes.fromhex(node_id), bytes([msg_type]), digest,
                     bytes([len(nonce_raw)]), nonce_raw))


@dataclass(frozen=True, kw_only=True)
class Identity:
    """A node's key pair (held in memory; transport.identity persists it)."""

    public_key: bytes  # ML-DSA-65 public key
    secret_key: bytes = field(repr=False)  # ML-DSA-65 secret key

    @property
    def node_id(self) -> str:
        return node_id_of(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        pk, sk = signatures().keygen()
        return cls(public_key=pk, secret_key=sk)

    def signer(self, *, run_id: str, round_: int, msg_type: int,
               nonce: str) -> Callable[[bytes], bytes]:
        """The `sign` callable shared.frame.encode_frame wants for one frame."""

        def sign(digest: bytes) -> bytes:
            msg = signing_bytes(run_id=run_id, round_=round_, node_id=self.node_id,
                                msg_type=msg_type, digest=digest, nonce=nonce)
            return signatures().sign(self.secret_key, msg, run_id.encode("utf-8"))

        return sign


T = TypeVar("T")


def _field(header: dict[str, Any], name: str, kind: type[T]) -> T:
    value = header.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MessageError(f"signed frame needs a {kind.__name__} field {name!r}", field=name)
    return value


def verify_frame(frame: Frame, *, public_key: bytes, run_id: str, node_id: str) -> str:
    """Check a frame's signature by `public_key` for `run_id`. Returns the nonce.

    Raises BadSignature (unsigned, wrong key, tampered) or MessageError (missing fields).
    """
    if frame.signature is None:
        raise BadSignature("this message must be signed by the sender's ML-DSA-65 key",
                           field="signature")
    nonce = _field(frame.header, "nonce", str)
    if not NONCE_RE.fullmatch(nonce):
        raise MessageError("nonce must be 32 lowercase hex digits", field="nonce")
    raw_round = frame.header.get("round")
    if raw_round is not None and (not isinstance(raw_round, int) or isinstance(raw_round, bool)
                                  or not -1 <= raw_round < 2**62):
        raise MessageError("round must be an integer", field="round")
    round_ = sign_round(raw_round)
    if node_id_of(public_key) != node_id:
        raise BadSignature("node_id is not the SHA-256 of the public key", field="node_id")
    msg = signing_bytes(run_id=run_id, round_=round_, node_id=node_id,
                        msg_type=frame.msg_type, digest=frame.covered, nonce=nonce)
    if not signatures().verify(public_key, msg, frame.signature, run_id.encode("utf-8")):
        raise BadSignature("signature does not verify for this node, run and frame",
                           field="signature")
    return nonce


class ReplayGuard:
    """Nonces seen per node, newest `capacity` kept; a repeat is a replay."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()

    def check_and_remember(self, node_id: str, nonce: str) -> None:
        key = (node_id, nonce)
        if key in self._seen:
            raise Replay("this nonce was already used: a replayed message", field="nonce")
        self._seen[key] = None
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def clear(self) -> None:
        self._seen.clear()
