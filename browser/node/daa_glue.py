"""Pyodide side of the browser bridge: hands `shared.platform` the tab's ML-DSA-65 and
ML-KEM-768 (@noble/post-quantum), zstd (fzstd + zstd-wasm), codec encoders (codecs.js,
byte-identical with shared.codecs on the golden vectors) and SparseLoCo's step (sparse_step.js).

pyodide_host.js registers the JS module `daa_bridge` and then runs this file; `shared` must
already be importable. Bytes cross as Uint8Array copies (`to_js` one way, `to_bytes` back).
"""

from __future__ import annotations

import json
from typing import Any

import daa_bridge  # type: ignore[import-not-found]  # registered by pyodide_host.js
from pyodide.ffi import JsException, to_js  # type: ignore[import-not-found]

from shared.errors import BadUpdate
from shared.platform import (
    register_kem,
    register_ring_masker,
    register_signatures,
    register_sparse_stepper,
    register_update_encoder,
    register_zstd,
)


class NobleMLDSA65:
    """shared.platform.SignatureScheme over @noble/post-quantum (pure mode, with context)."""

    name = "ml-dsa-65"

    def keygen(self) -> tuple[bytes, bytes]:
        pair = daa_bridge.mldsaKeygen()
        return pair.publicKey.to_bytes(), pair.secretKey.to_bytes()

    def sign(self, secret_key: bytes, message: bytes, context: bytes) -> bytes:
        sig = daa_bridge.mldsaSign(to_js(secret_key), to_js(message), to_js(context))
        return bytes(sig.to_bytes())

    def verify(self, public_key: bytes, message: bytes, signature: bytes,
               context: bytes) -> bool:
        return bool(daa_bridge.mldsaVerify(to_js(public_key), to_js(message), to_js(signature),
                                           to_js(context)))


class NobleMLKEM768:
    """shared.platform.Kem over @noble/post-quantum's ml_kem768 (browser/node/secagg.js):
    secure aggregation's pair keys. A malformed key or ciphertext raises ValueError."""

    name = "ml-kem-768"

    def keygen(self) -> tuple[bytes, bytes]:
        pair = daa_bridge.mlkemKeygen()
        return bytes(pair.publicKey.to_bytes()), bytes(pair.secretKey.to_bytes())

    def encaps(self, public_key: bytes) -> tuple[bytes, bytes]:
        try:
            out = daa_bridge.mlkemEncaps(to_js(public_key))
        except JsException as exc:
            raise ValueError(str(exc)) from None
        return bytes(out.cipherText.to_bytes()), bytes(out.sharedSecret.to_bytes())

    def decaps(self, secret_key: bytes, ciphertext: bytes) -> bytes:
        try:
            return bytes(daa_bridge.mlkemDecaps(to_js(secret_key), to_js(ciphertext)).to_bytes())
        except JsException as exc:
            raise ValueError(str(exc)) from None


class BrowserRingMasker:
    """shared.platform.RingMasker over secagg.js: the tab's mask loop in JS (the Python loop
    over array("I") costs about 0.2 s per mask of 131k words in Pyodide)."""

    def add_masks(self, words: bytes, terms: list[tuple[bytes, int]], start: int) -> bytes:
        seeds = b"".join(seed for seed, _ in terms)
        out = daa_bridge.secaggAddMasks(to_js(words), to_js(seeds),
                                        to_js([sign for _, sign in terms]), start)
        return bytes(out.to_bytes())


class BrowserZstd:
    """shared.platform.Zstd over the tab's zstd.js (decompress raises ValueError)."""

    def compress(self, data: bytes) -> bytes:
        return bytes(daa_bridge.zstdCompress(to_js(data)).to_bytes())

    def decompress(self, data: bytes, max_size: int) -> bytes:
        try:
            return bytes(daa_bridge.zstdDecompress(to_js(data), max_size).to_bytes())
        except JsException as exc:
            raise ValueError(str(exc)) from None


class BrowserEncoder:
    """shared.platform.UpdateEncoder over codecs.js: the residual loop and the codec's loops
    run in JS, not in Python (~30 ms per pass over 1M floats here)."""

    codecs = frozenset(str(c) for c in daa_bridge.encodeCodecs())

    def encode(self, codec: str, params: dict[str, Any], delta: bytes, residual: bytes | None,
               error_feedback: bool) -> tuple[bytes, bytes | None]:
        out = daa_bridge.encodeUpdate(codec, json.dumps(params), to_js(delta),
                                      to_js(residual) if residual is not None else None,
                                      error_feedback)
        res = getattr(out, "residual", None)  # undefined (None) when nothing was lost
        return bytes(out.payload.to_bytes()), (bytes(res.to_bytes()) if res is not None else None)


class BrowserSparseStep:
    """shared.platform.SparseStepper over sparse_step.js: SparseLoCo's step applied in JS
    (golden-checked against numpy's apply_sparse); a malformed payload is BadUpdate."""

    def step(self, theta: bytes, payload: bytes) -> bytes:
        try:
            return bytes(daa_bridge.sparseStep(to_js(theta), to_js(payload)).to_bytes())
        except JsException as exc:
            raise BadUpdate(f"sparse step: {exc}", field="payload") from None


register_signatures(NobleMLDSA65())
register_kem(NobleMLKEM768())
register_ring_masker(BrowserRingMasker())
register_update_encoder(BrowserEncoder())
register_sparse_stepper(BrowserSparseStep())
if daa_bridge.zstdCanCompress():
    register_zstd(BrowserZstd())
