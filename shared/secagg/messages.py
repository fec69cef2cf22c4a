"""Secure-aggregation messages: frozen, keyword-only dataclasses, canonical JSON, signed.

Every message a participant sends is signed with its ML-DSA-65 identity (shared.envelope's
Identity, pure mode, the run id as context) over DOMAIN || canonical JSON of its fields other
than `signature`. Canonical JSON: sorted keys, no spaces, ASCII. Bytes travel as base64
(keys, ciphertexts, sealed shares) or hex (digests, commitments, shares). The masked vector
itself travels as raw bytes beside its JSON header, which carries its SHA-256.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, TypeVar

from shared.envelope import Identity, node_id_of
from shared.errors import MessageError
from shared.platform import signatures

DOMAIN = b"DAAP-SECAGG-v1"
M = TypeVar("M", bound="_Signed")


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise MessageError(f"{name} is not base64", field=name) from exc


@dataclass(frozen=True, kw_only=True, slots=True)
class _Signed:
    run_id: str  # the run
    round: int  # the outer round
    node_id: str  # sender: SHA-256 of its ML-DSA-65 public key, hex
    signature: str = ""  # base64 ML-DSA-65 signature over signed_bytes()

    def body(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("signature")
        return d

    def signed_bytes(self) -> bytes:
        return DOMAIN + type(self).__name__.encode() + b"\x00" + canonical(self.body())

    def signed_by(self: M, identity: Identity) -> M:
        sig = signatures().sign(identity.secret_key, self.signed_bytes(), self.run_id.encode())
        return replace(self, signature=b64(sig))

    def verify(self, public_key: bytes) -> bool:
        if node_id_of(public_key) != self.node_id:
            return False
        try:
            sig = base64.b64decode(self.signature, validate=True)
        except (binascii.Error, ValueError):
            return False
        return signatures().verify(public_key, self.signed_bytes(), sig, self.run_id.encode())

    def to_json(self) -> bytes:
        return canonical(asdict(self))

    def wire_size(self) -> int:
        return len(self.to_json())

    @classmethod
    def from_json(cls: type[M], data: bytes) -> M:
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MessageError(f"{cls.__name__} is not JSON") from exc
        if not isinstance(raw, dict) or set(raw) != {f.name for f in fields(cls)}:
            raise MessageError(f"{cls.__name__} needs exactly the fields "
                               f"{sorted(f.name for f in fields(cls))}")
        kwargs = {}
        for f in fields(cls):
            value = raw[f.name]
            kwargs[f.name] = _tuplify(value) if isinstance(value, list) else value
        msg = cls(**kwargs)
        msg.validate()
        return msg

    def validate(self) -> None:
        if not isinstance(self.run_id, str) or not isinstance(self.node_id, str):
            raise MessageError("run_id and node_id must be strings", field="node_id")
        if not isinstance(self.round, int) or isinstance(self.round, bool) or self.round < 0:
            raise MessageError("round must be a non-negative integer", field="round")


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyAdvert(_Signed):
    """Stage 1: a participant's identity key and its fresh ML-KEM-768 encapsulation key."""

    signing_key: str = ""  # base64 ML-DSA-65 public key (node_id is its SHA-256)
    kem_key: str = ""  # base64 ML-KEM-768 encapsulation key, fresh this round


@dataclass(frozen=True, kw_only=True, slots=True)
class PairCiphertexts(_Signed):
    """Stage 2: for each neighbour with a larger node id, a KEM ciphertext to it.
    entries: (peer node id, base64 ciphertext, commitment to the shared secret)."""

    entries: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class ShareBundle(_Signed):
    """Stage 3: Shamir shares of (self-mask seed, pair keys...) sealed to each neighbour.
    partners: the neighbours whose pair keys are shared, in share order.
    entries: (holder, base64 sealed shares, commitment to the self-mask share, commitment to
    the pair-key shares). complaints: neighbours whose ciphertext failed its commitment.
    own_commit: see shared.secagg.participant.own_share."""

    self_commit: str = ""  # commitment to the self-mask seed
    partners: tuple[str, ...] = ()
    entries: tuple[tuple[str, str, str, str], ...] = ()
    complaints: tuple[str, ...] = ()
    own_commit: str = ""  # commitment to the dealer's own self-mask share (even degree), or ""


@dataclass(frozen=True, kw_only=True, slots=True)
class MaskedUpdate(_Signed):
    """Stage 4: the masked fixed-point update (raw u32 LE `payload`, outside the JSON)."""

    ring_bits: int = 32  # the ring Z_2^ring_bits
    offset: int = 0  # first coordinate of the payload in the whole vector
    length: int = 0  # number of u32 words in the payload
    payload_sha256: str = ""  # hex SHA-256 of the payload
    payload: bytes = b""  # not part of the JSON

    def body(self) -> dict[str, Any]:
        d = _Signed.body(self)
        d.pop("payload")
        return d

    def to_json(self) -> bytes:
        d = self.body()
        d["signature"] = self.signature
        return canonical(d)

    def wire_size(self) -> int:
        return len(self.to_json()) + len(self.payload)

    def digest_ok(self) -> bool:
        return hashlib.sha256(self.payload).hexdigest() == self.payload_sha256


@dataclass(frozen=True, kw_only=True, slots=True)
class UnmaskRequest:
    """Stage 5 (from the aggregator): who submitted a masked update, who did not."""

    run_id: str
    round: int
    survivors: tuple[str, ...]  # submitted: reveal their self-mask shares
    dropped: tuple[str, ...]  # did not: reveal their pair-key shares


@dataclass(frozen=True, kw_only=True, slots=True)
class UnmaskResponse(_Signed):
    """Stage 5: the holder's shares. self_shares: (dealer, hex share of its self-mask seed);
    key_shares: (dealer, hex concatenated shares of its pair keys)."""

    self_shares: tuple[tuple[str, str], ...] = ()
    key_shares: tuple[tuple[str, str], ...] = ()
