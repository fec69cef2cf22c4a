"""Signed peer records: who a node is, where to reach it, until when.

A record is the only thing the DHT believes about a node, and only its owner can make one:

    field       JSON type   meaning
    node_id     str         64 lowercase hex: SHA-256 of public_key (shared.envelope)
    public_key  str         ML-DSA-65 public key, lowercase hex (1952 bytes)
    addrs       [str]       1..8 transport hints ("mem:17", "ws:relay/<node id>", "rtc"), <= 256
                            chars each: opaque to the DHT, meaningful to a carrier
    seq         int         version, 0..2^53-1; the owner signs a new record with a larger seq
                            (the signing time in ms) whenever its addresses change or it renews
    expires     int         unix seconds; absolute (a record is passed on second-hand, so a
                            duration would have no origin); refused once past by the
                            receiver's clock, or if more than MAX_TTL_S + MAX_SKEW_S ahead
    signature   str         ML-DSA-65 (pure mode, context CONTEXT) over signing_bytes(), hex

signing_bytes = DOMAIN || canonical_json({"addrs", "expires", "node_id", "seq"}); the public
key is bound through node_id = SHA-256(public_key).

`RecordStore` verifies each record VERSION once (ML-DSA verify ~0.2 ms, sign ~9 ms here) and
keeps the newest verified record per node. A copy identical to the held one costs a string
comparison; a forged copy is remembered (by digest) so that repeating it costs nothing either.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from shared.dht.errors import ExpiredRecord, ForgedRecord, MalformedRecord, StaleRecord
from shared.envelope import Identity
from shared.frame import canonical_json
from shared.platform import signatures

DOMAIN = b"DAAP-DHT-REC-v1\x00"
CONTEXT = b"daa-prime-dht"
MAX_ADDRS = 8
MAX_ADDR_LEN = 256
MAX_SEQ = 2**53 - 1
MAX_TTL_S = 24 * 3600  # no honest node signs a record for longer than a day
MAX_SKEW_S = 300  # clocks may disagree by this much (expiry is checked with this slack)
PUBLIC_KEY_HEX = 2 * 1952
SIGNATURE_HEX = 2 * 3309
HEX64 = re.compile(r"[0-9a-f]{64}")
FIELDS = ("addrs", "expires", "node_id", "public_key", "seq", "signature")


def is_lower_hex(value: object, length: int) -> bool:
    """`value` is exactly `length` lowercase hex digits (bytes.fromhex is ~3x faster than a
    regex over the 10 KB a record's key and signature take)."""
    if not isinstance(value, str) or len(value) != length or not value.isascii():
        return False
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return False
    return 2 * len(raw) == length and not any(c in value for c in "ABCDEF")


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerRecord:
    """One signed version of a node's record (hex kept as received; decoded on verify)."""

    node_id: str  # SHA-256 of public_key, 64 lowercase hex digits
    public_key: str  # ML-DSA-65 public key, lowercase hex
    addrs: tuple[str, ...]  # transport hints, in the owner's order of preference
    seq: int  # version: larger is newer
    expires: int  # unix seconds after which nobody may use it
    signature: str  # ML-DSA-65 signature over signing_bytes(), lowercase hex
    # its canonical JSON, made once on first use (a record is sent and hashed many times)
    _json: list[str] = field(default_factory=list, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise MalformedRecord(f"PeerRecord.{name}: {what}", field=name)

        need(isinstance(self.node_id, str) and bool(HEX64.fullmatch(self.node_id)), "node_id",
             "must be 64 lowercase hex digits")
        need(is_lower_hex(self.public_key, PUBLIC_KEY_HEX), "public_key",
             f"must be {PUBLIC_KEY_HEX} lowercase hex digits")
        need(isinstance(self.addrs, tuple) and 1 <= len(self.addrs) <= MAX_ADDRS
             and all(isinstance(a, str) and 0 < len(a) <= MAX_ADDR_LEN for a in self.addrs),
             "addrs", f"must be 1..{MAX_ADDRS} strings of 1..{MAX_ADDR_LEN} chars")
        for name in ("seq", "expires"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEQ, name,
                 "must be an integer in [0, 2^53-1]")
        need(is_lower_hex(self.signature, SIGNATURE_HEX), "signature",
             f"must be {SIGNATURE_HEX} lowercase hex digits")

    @property
    def key(self) -> int:
        """The node id as an integer: the point of the XOR metric."""
        return int(self.node_id, 16)

    def signing_bytes(self) -> bytes:
        return signing_bytes(node_id=self.node_id, addrs=self.addrs, seq=self.seq,
                             expires=self.expires)

    def digest(self) -> str:
        """SHA-256 of the record's canonical JSON: the identity of this exact version."""
        return hashlib.sha256(self.json().encode("utf-8")).hexdigest()

    def json(self) -> str:
        """canonical_json(self.to_dict()) as text, computed once."""
        if not self._json:
            self._json.append(canonical_json(self.to_dict()).decode("utf-8"))
        return self._json[0]

    def to_dict(self) -> dict[str, Any]:
        return {"addrs": list(self.addrs), "expires": self.expires, "node_id": self.node_id,
                "public_key": self.public_key, "seq": self.seq, "signature": self.signature}

    @classmethod
    def from_dict(cls, obj: Any) -> PeerRecord:
        if not isinstance(obj, dict):
            raise MalformedRecord("a peer record must be a JSON object", field="record")
        missing = [f for f in FIELDS if f not in obj]
        extra = sorted(set(obj) - set(FIELDS))
        if missing or extra:
            name = (missing or extra)[0]
            raise MalformedRecord(f"PeerRecord: {'missing' if missing else 'unknown'} field "
                                  f"{name!r}", field=name)
        addrs = obj["addrs"]
        if not isinstance(addrs, list):
            raise MalformedRecord("PeerRecord.addrs: must be a list", field="addrs")
        return cls(node_id=obj["node_id"], public_key=obj["public_key"], addrs=tuple(addrs),
                   seq=obj["seq"], expires=obj["expires"], signature=obj["signature"])


def signing_bytes(*, node_id: str, addrs: tuple[str, ...], seq: int, expires: int) -> bytes:
    return DOMAIN + canonical_json({"addrs": list(addrs), "expires": expires,
                                    "node_id": node_id, "seq": seq})


def sign_record(identity: Identity, *, addrs: tuple[str, ...], seq: int,
                expires: int) -> PeerRecord:
    """The owner's record, signed with its ML-DSA-65 key (~9 ms natively)."""
    msg = signing_bytes(node_id=identity.node_id, addrs=addrs, seq=seq, expires=expires)
    sig = signatures().sign(identity.secret_key, msg, CONTEXT)
    return PeerRecord(node_id=identity.node_id, public_key=identity.public_key.hex(),
                      addrs=addrs, seq=seq, expires=expires, signature=sig.hex())


def verify_record(rec: PeerRecord) -> None:
    """Raises ForgedRecord unless the owner of node_id signed exactly this record."""
    pk = bytes.fromhex(rec.public_key)
    if hashlib.sha256(pk).hexdigest() != rec.node_id:
        raise ForgedRecord("node_id is not the SHA-256 of the record's public key",
                           field="node_id")
    if not signatures().verify(pk, rec.signing_bytes(), bytes.fromhex(rec.signature), CONTEXT):
        raise ForgedRecord("the signature does not verify for this record and key",
                           field="signature")


class RecordStore:
    """The newest verified record per node, at most `capacity` of them (oldest use out)."""

    def __init__(self, capacity: int = 4096, forged_capacity: int = 1024) -> None:
        self.capacity = capacity
        self._by_id: OrderedDict[str, PeerRecord] = OrderedDict()
        self._forged: OrderedDict[str, None] = OrderedDict()
        self._forged_capacity = forged_capacity
        self.verifications = 0  # signature checks done (one per new record version)
        self.cache_hits = 0  # copies of a held version accepted without a signature check

    def get(self, node_id: str) -> PeerRecord | None:
        return self._by_id.get(node_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._by_id

    def check(self, rec: PeerRecord, now: float) -> PeerRecord | None:
        """The cheap checks: the held record if `rec` is a copy of it, None if `rec` is new
        and needs `accept` (a signature check). Raises ExpiredRecord, StaleRecord."""
        if rec.expires <= now:
            raise ExpiredRecord(f"record of {rec.node_id[:12]} expired at {rec.expires}",
                                field="expires")
        if rec.expires > now + MAX_TTL_S + MAX_SKEW_S:
            raise ExpiredRecord(f"record of {rec.node_id[:12]} claims to live until "
                                f"{rec.expires}, beyond the {MAX_TTL_S} s limit",
                                field="expires")
        held = self._by_id.get(rec.node_id)
        if held is not None:
            if rec.seq < held.seq:
                raise StaleRecord(f"seq {rec.seq} is older than the held {held.seq}",
                                  field="seq")
            if rec.seq == held.seq:
                if rec == held:
                    self.cache_hits += 1
                    self._by_id.move_to_end(rec.node_id)
                    return held
                raise StaleRecord(f"a different record under the held seq {held.seq}",
                                  field="seq")
        return None

    def accept(self, rec: PeerRecord, now: float) -> PeerRecord:
        """Check `rec` and keep it if newer; returns the record now held for that node.

        Raises ExpiredRecord, StaleRecord, ForgedRecord (typed, shared.dht.errors)."""
        held = self.check(rec, now)
        if held is not None:
            return held
        digest = rec.digest()
        if digest in self._forged:
            raise ForgedRecord("this record was already refused as forged", field="signature")
        self.verifications += 1
        try:
            verify_record(rec)
        except ForgedRecord:
            self._forged[digest] = None
            while len(self._forged) > self._forged_capacity:
                self._forged.popitem(last=False)
            raise
        self._by_id[rec.node_id] = rec
        self._by_id.move_to_end(rec.node_id)
        while len(self._by_id) > self.capacity:
            self._by_id.popitem(last=False)
        return rec

    def drop_expired(self, now: float) -> list[str]:
        gone = [nid for nid, r in self._by_id.items() if r.expires <= now]
        for nid in gone:
            del self._by_id[nid]
        return gone
