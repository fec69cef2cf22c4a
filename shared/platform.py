"""Native vs browser primitives that Python's stdlib lacks: ML-DSA-65 signatures, ML-KEM-768
(secure aggregation's pair keys, shared/secagg) and zstd.

Chosen in ONE place. Natively the implementations import `pqcrypto` and `zstandard` lazily
(never at import time: `shared` must import in Pyodide). In the browser, the JS bridge calls
`register_signatures(...)` / `register_kem(...)` / `register_zstd(...)` with @noble/post-quantum
and a zstd wasm.
"""

from __future__ import annotations

from typing import Any, Protocol

from shared.vec import IN_BROWSER


class SignatureScheme(Protocol):
    name: str

    def keygen(self) -> tuple[bytes, bytes]: ...  # (public key, secret key)

    def sign(self, secret_key: bytes, message: bytes, context: bytes) -> bytes: ...

    def verify(self, public_key: bytes, message: bytes, signature: bytes,
               context: bytes) -> bool: ...


class Zstd(Protocol):
    def compress(self, data: bytes) -> bytes: ...

    def decompress(self, data: bytes, max_size: int) -> bytes: ...  # raises ValueError


class UpdateEncoder(Protocol):
    """A faster path for a participant's hot loop: delta (+ residual) -> codec payload.

    Float32 LE bytes in and out; returns (payload, new residual or None when error feedback is
    off). It must produce exactly the bytes `shared.codecs` would (the browser's codecs.js is
    checked against the golden vectors). Codecs it does not list go the pure-Python way."""

    codecs: frozenset[str]

    def encode(self, codec: str, params: dict[str, Any], delta: bytes, residual: bytes | None,
               error_feedback: bool) -> tuple[bytes, bytes | None]: ...


class PqcryptoMLDSA65:
    """ML-DSA-65 (FIPS 204) in pure mode through pqcrypto; interoperable with noble."""

    name = "ml-dsa-65"
    PUBLIC_KEY_LEN = 1952
    SECRET_KEY_LEN = 4032
    SIGNATURE_LEN = 3309

    def keygen(self) -> tuple[bytes, bytes]:
        from pqcrypto import ml_dsa_65

        pk, sk = ml_dsa_65.keygen()
        return bytes(pk), bytes(sk)

    def sign(self, secret_key: bytes, message: bytes, context: bytes) -> bytes:
        from pqcrypto import ml_dsa_65

        return bytes(ml_dsa_65.sign(secret_key, message, context=context))

    def verify(self, public_key: bytes, message: bytes, signature: bytes,
               context: bytes) -> bool:
        import pqcrypto
        from pqcrypto import ml_dsa_65

        if len(public_key) != self.PUBLIC_KEY_LEN or len(signature) != self.SIGNATURE_LEN:
            return False
        try:
            ml_dsa_65.verify(public_key, message, signature, context=context)
        except (pqcrypto.InvalidSignatureError, ValueError, TypeError):
            return False
        return True


class ZstandardZstd:
    """zstd through the `zstandard` package, with a hard cap on the inflated size."""

    level = 3

    def compress(self, data: bytes) -> bytes:
        import zstandard

        return bytes(zstandard.ZstdCompressor(level=self.level).compress(data))

    def decompress(self, data: bytes, max_size: int) -> bytes:
        """One zstd frame that declares its content size (<= max_size); anything else is
        refused with ValueError before a byte is inflated."""
        import zstandard

        try:
            params = zstandard.get_frame_parameters(data)
            size = params.content_size
            if size == zstandard.CONTENTSIZE_UNKNOWN:
                raise ValueError("the zstd frame does not declare its content size")
            if size > max_size:
                raise ValueError(f"inflates to {size} bytes, beyond the {max_size} byte limit")
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=max_size)
        except zstandard.ZstdError as exc:
            raise ValueError(f"not a valid zstd frame: {exc}") from exc
        if len(out) != size:
            raise ValueError(f"inflated to {len(out)} bytes, the frame declared {size}")
        return bytes(out)


class NativeMLDSA65(PqcryptoMLDSA65):
    """ML-DSA-65 natively: new keys are 32-byte seeds (FIPS 204's ξ, the private-key form of
    RFC 9881) signed through `cryptography` (OpenSSL 3.5+), about 11x faster than pqcrypto's
    10 ms a signature here (bench.signatures); an expanded 4032-byte secret key (key files
    written before, the golden vectors) still signs through pqcrypto. Signatures are the same
    standard either way (pure mode, context): every verifier (pqcrypto, OpenSSL, noble in tabs)
    accepts both. Where `cryptography` lacks ML-DSA, keys are generated the pqcrypto way."""

    SEED_LEN = 32

    def __init__(self) -> None:
        self._keys: dict[bytes, Any] = {}  # seed -> loaded private key (signing is hot)
        self._seeded: bool | None = None

    def seeded(self) -> bool:
        """Whether `cryptography` here signs ML-DSA-65 from a seed."""
        if self._seeded is None:
            try:
                from cryptography.hazmat.primitives.asymmetric import mldsa

                mldsa.MLDSA65PrivateKey.from_seed_bytes(bytes(self.SEED_LEN))
                self._seeded = True
            except Exception:  # ImportError, UnsupportedAlgorithm: an older OpenSSL/cryptography
                self._seeded = False
        return self._seeded

    def _key(self, seed: bytes) -> Any:
        key = self._keys.get(seed)
        if key is None:
            from cryptography.hazmat.primitives.asymmetric import mldsa

            if len(self._keys) >= 4096:  # simulators hold thousands of identities
                self._keys.clear()
            key = self._keys[seed] = mldsa.MLDSA65PrivateKey.from_seed_bytes(seed)
        return key

    def keygen(self) -> tuple[bytes, bytes]:
        if not self.seeded():
            return super().keygen()
        import os

        seed = os.urandom(self.SEED_LEN)
        return self.public_key_of(seed), seed

    def public_key_of(self, seed: bytes) -> bytes:
        return bytes(self._key(seed).public_key().public_bytes_raw())

    def sign(self, secret_key: bytes, message: bytes, context: bytes) -> bytes:
        if len(secret_key) == self.SEED_LEN:
            if not self.seeded():
                raise RuntimeError("this key is a 32-byte ML-DSA-65 seed, which needs the "
                                   "`cryptography` package (>= 50) to sign")
            return bytes(self._key(bytes(secret_key)).sign(message, context))
        return super().sign(secret_key, message, context)


_signatures: SignatureScheme | None = None if IN_BROWSER else NativeMLDSA65()
_zstd: Zstd | None = None if IN_BROWSER else ZstandardZstd()


def register_signatures(scheme: SignatureScheme) -> None:
    global _signatures
    _signatures = scheme


_update_encoder: UpdateEncoder | None = None


def register_update_encoder(impl: UpdateEncoder | None) -> None:
    """The tab registers its JS codecs here (None: back to shared.codecs)."""
    global _update_encoder
    _update_encoder = impl


def update_encoder() -> UpdateEncoder | None:
    return _update_encoder


def register_zstd(impl: Zstd) -> None:
    global _zstd
    _zstd = impl


def signatures() -> SignatureScheme:
    if _signatures is None:
        raise RuntimeError("no ML-DSA implementation registered (browser bridge not loaded)")
    return _signatures


def zstd() -> Zstd | None:
    """The zstd implementation, or None where there is none (then nothing is compressed)."""
    if _zstd is not None and not IN_BROWSER:
        try:
            import zstandard  # noqa: F401
        except ImportError:
            return None
    return _zstd


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


class RingMasker(Protocol):
    """Adds secure aggregation's masks to a ring vector in one call (the tab's JS loop,
    browser/node/secagg.js: bit-identical with shared.secagg.prg, golden-checked)."""

    def add_masks(self, words: bytes, terms: list[tuple[bytes, int]], start: int) -> bytes:
        """u32 LE `words` + sum of sign * mask(seed)[start:] over `terms` (mod 2^32)."""
        ...


_ring_masker: RingMasker | None = None


def register_ring_masker(impl: RingMasker | None) -> None:
    """The tab registers its JS mask loop here (None: shared.secagg.prg's Python loop)."""
    global _ring_masker
    _ring_masker = impl


def ring_masker() -> RingMasker | None:
    return _ring_masker


class SparseStepper(Protocol):
    """SparseLoCo's step where numpy is missing (the tab's JS, browser/node/sparse_step.js,
    golden-checked): theta_{r-1} (float32 LE bytes) and a "sparse" RoundOpen payload ->
    theta_r's bytes, the bits of shared.sparseloco.apply_sparse; BadUpdate if malformed."""

    def step(self, theta: bytes, payload: bytes) -> bytes: ...


_sparse_stepper: SparseStepper | None = None


def register_sparse_stepper(impl: SparseStepper | None) -> None:
    """The tab registers its JS sparse step here (natively numpy applies it)."""
    global _sparse_stepper
    _sparse_stepper = impl


def sparse_stepper() -> SparseStepper | None:
    return _sparse_stepper
