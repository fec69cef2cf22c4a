"""ML-KEM-768 (chosen in one place, like shared.platform's ML-DSA) and the small symmetric
pieces built on SHA-256 / SHAKE-128 / HMAC, all of which JavaScript computes identically.

Natively ML-KEM comes from pqcrypto (imported lazily: shared must import in Pyodide); the tab
registers @noble/post-quantum's ml_kem768 with `register_kem`.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Protocol

from shared.vec import IN_BROWSER

TAG_LEN = 32


class Kem(Protocol):
    name: str

    def keygen(self) -> tuple[bytes, bytes]: ...  # (encapsulation key, decapsulation key)

    def encaps(self, public_key: bytes) -> tuple[bytes, bytes]: ...  # (ciphertext, secret)

    def decaps(self, secret_key: bytes, ciphertext: bytes) -> bytes: ...


class PqcryptoMLKEM768:
    """ML-KEM-768 (FIPS 203) through pqcrypto; interoperable with @noble/post-quantum."""

    name = "ML-KEM-768"
    PUBLIC_KEY_LEN = 1184
    CIPHERTEXT_LEN = 1088

    def keygen(self) -> tuple[bytes, bytes]:
        from pqcrypto import ml_kem_768

        pk, sk = ml_kem_768.keygen()
        return bytes(pk), bytes(sk)

    def encaps(self, public_key: bytes) -> tuple[bytes, bytes]:
        from pqcrypto import ml_kem_768

        if len(public_key) != self.PUBLIC_KEY_LEN:
            raise ValueError("not an ML-KEM-768 encapsulation key")
        ct, ss = ml_kem_768.encaps(public_key)
        return bytes(ct), bytes(ss)

    def decaps(self, secret_key: bytes, ciphertext: bytes) -> bytes:
        from pqcrypto import ml_kem_768

        if len(ciphertext) != self.CIPHERTEXT_LEN:
            raise ValueError("not an ML-KEM-768 ciphertext")
        return bytes(ml_kem_768.decaps(secret_key, ciphertext))


_kem: Kem | None = None if IN_BROWSER else PqcryptoMLKEM768()


def register_kem(impl: Kem) -> None:
    global _kem
    _kem = impl


def kem() -> Kem:
    if _kem is None:
        raise RuntimeError("no ML-KEM implementation registered (browser bridge not loaded)")
    return _kem


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
