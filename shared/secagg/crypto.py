"""The small symmetric pieces of secure aggregation, built on SHA-256 / SHAKE-128 / HMAC, all
of which JavaScript computes identically. ML-KEM-768 is behind shared.platform (`kem()`:
pqcrypto natively, imported lazily; the tab registers @noble/post-quantum's ml_kem768 with
`register_kem`); re-exported here.
"""

from __future__ import annotations

import hashlib
import hmac

from shared.platform import Kem, PqcryptoMLKEM768, kem, register_kem

__all__ = ["Kem", "PqcryptoMLKEM768", "commit", "derive", "kem", "open_sealed",
           "register_kem", "seal"]

TAG_LEN = 32


def derive(label: str, key: bytes, *context: str) -> bytes:
    """SHA-256("DAAP-SECAGG-" label 0x00 key (0x00 context)*): the one KDF here."""
    parts = [b"DAAP-SECAGG-" + label.encode(), key, *(c.encode() for c in context)]
    return hashlib.sha256(b"\x00".join(parts)).digest()


def commit(label: str, data: bytes, *context: str) -> str:
    return derive("commit-" + label, data, *context).hex()


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def seal(pair_key: bytes, aad: bytes, plaintext: bytes) -> bytes:
    """Encrypt-then-MAC: SHAKE-128 keystream XOR, HMAC-SHA-256 tag over aad || ciphertext.
    `aad` names the direction (dealer, holder), so the two directions never share a stream."""
    stream = hashlib.shake_128(derive("seal", pair_key) + hashlib.sha256(aad).digest())
    ct = _xor(plaintext, stream.digest(len(plaintext)))
    tag = hmac.new(derive("mac", pair_key), aad + ct, hashlib.sha256).digest()
    return ct + tag


def open_sealed(pair_key: bytes, aad: bytes, sealed: bytes) -> bytes | None:
    """The plaintext, or None when the tag does not verify."""
    if len(sealed) < TAG_LEN:
        return None
    ct, tag = sealed[:-TAG_LEN], sealed[-TAG_LEN:]
    want = hmac.new(derive("mac", pair_key), aad + ct, hashlib.sha256).digest()
    if not hmac.compare_digest(tag, want):
        return None
    stream = hashlib.shake_128(derive("seal", pair_key) + hashlib.sha256(aad).digest())
    return _xor(ct, stream.digest(len(ct)))
