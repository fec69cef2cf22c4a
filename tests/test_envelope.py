"""Signed envelopes (ML-DSA-65), replay guard, zstd payloads."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import pytest

from shared.envelope import (
    DOMAIN,
    Identity,
    ReplayGuard,
    new_nonce,
    node_id_of,
    signing_bytes,
    verify_frame,
)
from shared.errors import BadSignature, FrameError, MessageError, Replay
from shared.frame import FLAG_SIGNED, FLAG_ZSTD, decode_frame, encode_frame
from shared.messages import Submit, decode_message, sha256_hex
from shared.platform import signatures, zstd

GOLDEN = Path(__file__).resolve().parent.parent / "shared" / "testdata" / "frames.json"
RUN = "run-42"


@pytest.fixture(scope="module")
def ident() -> Identity:
    return Identity.generate()


def submit(ident: Identity, payload: bytes = b"\x00" * 64, **over: object) -> Submit:
    fields: dict[str, object] = dict(run_id=RUN, round=3, node_id=ident.node_id,
                                     nonce=new_nonce(), codec="raw32", length=len(payload) // 4,
                                     digest=sha256_hex(payload), train_loss=None, samples=1,
                                     compute_s=0.5, payload=payload)
    fields.update(over)
    return Submit(**fields)  # type: ignore[arg-type]


def signed(ident: Identity, msg: Submit, **over: object) -> bytes:
    args: dict[str, object] = dict(run_id=RUN, round_=msg.round, msg_type=msg.TYPE,
                                   nonce=msg.nonce)
    args.update(over)
    return msg.to_frame(sign=ident.signer(**args))  # type: ignore[arg-type]


def test_key_sizes_and_node_id(ident: Identity) -> None:
    assert len(ident.public_key) == 1952
    assert len(ident.secret_key) == 32  # the seed (FIPS 204's ξ): signed through OpenSSL
    assert ident.node_id == node_id_of(ident.public_key)
    assert len(ident.node_id) == 64


def test_signing_bytes_layout() -> None:
    node = "ab" * 32
    raw = signing_bytes(run_id="r1", round_=7, node_id=node, msg_type=4, digest=b"\x11" * 32,
                        nonce="22" * 16)
    n = 2
    assert raw[:11] == DOMAIN == b"DAAP-SIG-v1"
    assert struct.unpack_from("<H", raw, 11)[0] == n
    assert raw[13:15] == b"r1"
    assert struct.unpack_from("<q", raw, 13 + n)[0] == 7
    assert raw[21 + n:53 + n] == bytes.fromhex(node)
    assert raw[53 + n] == 4
    assert raw[54 + n:86 + n] == b"\x11" * 32
    assert raw[86 + n] == 16
    assert raw[87 + n:] == b"\x22" * 16
    assert len(raw) == 103 + n


def test_signed_frame_verifies(ident: Identity) -> None:
    msg = submit(ident)
    frame = decode_frame(signed(ident, msg))
    assert frame.flags & FLAG_SIGNED
    assert frame.signature is not None
    assert verify_frame(frame, public_key=ident.public_key, run_id=RUN,
                        node_id=ident.node_id) == msg.nonce
    assert decode_message(signed(ident, msg)) == msg


@pytest.mark.parametrize("where", ["fixed", "header", "payload", "signature"])
def test_any_flipped_bit_breaks_the_signature(ident: Identity, where: str) -> None:
    data = bytearray(signed(ident, submit(ident)))
    head_len = struct.unpack_from("<I", data, 8)[0]
    pos = {"fixed": 12, "header": 16 + head_len // 2, "payload": 16 + head_len + 5,
           "signature": len(data) - 7}[where]
    data[pos] ^= 0x40
    with pytest.raises((BadSignature, FrameError, MessageError)):
        verify_frame(decode_frame(bytes(data)), public_key=ident.public_key, run_id=RUN,
                     node_id=ident.node_id)


def test_wrong_key_run_round_or_unsigned(ident: Identity) -> None:
    other = Identity.generate()
    msg = submit(ident)
    cases = [
        (signed(other, msg), ident.public_key, ident.node_id),  # someone else's signature
        (signed(ident, msg), other.public_key, ident.node_id),  # claimed with another key
        (signed(ident, msg, run_id="other"), ident.public_key, ident.node_id),
        (signed(ident, msg, round_=4), ident.public_key, ident.node_id),
        (msg.to_frame(), ident.public_key, ident.node_id),  # unsigned
    ]
    for data, pk, node in cases:
        with pytest.raises(BadSignature):
            verify_frame(decode_frame(data), public_key=pk, run_id=RUN, node_id=node)


def test_replay_guard() -> None:
    guard = ReplayGuard(capacity=2)
    guard.check_and_remember("a", "n1")
    guard.check_and_remember("b", "n1")  # per node
    with pytest.raises(Replay):
        guard.check_and_remember("a", "n1")
    guard.check_and_remember("a", "n2")
    guard.check_and_remember("a", "n3")  # capacity 2: the oldest are forgotten
    guard.check_and_remember("b", "n1")
    guard.clear()
    guard.check_and_remember("a", "n3")


def test_golden_signed_frames_verify() -> None:
    doc = json.loads(GOLDEN.read_text())["signed"]
    pk = bytes.fromhex(doc["public_key_hex"])
    assert node_id_of(pk) == doc["node_id"]
    for case in doc["frames"]:
        frame = decode_frame(bytes.fromhex(case["frame_hex"]))
        assert verify_frame(frame, public_key=pk, run_id=doc["run_id"],
                            node_id=doc["node_id"]) == case["nonce"]
    # and a frame signed now with the stored secret key verifies with the stored public key
    ident = Identity(public_key=pk, secret_key=bytes.fromhex(doc["secret_key_hex"]))
    again = decode_frame(signed(ident, submit(ident)))
    verify_frame(again, public_key=pk, run_id=RUN, node_id=ident.node_id)


def test_pqcrypto_signatures_are_randomized(ident: Identity) -> None:
    a = signatures().sign(ident.secret_key, b"m", b"ctx")
    b = signatures().sign(ident.secret_key, b"m", b"ctx")
    assert a != b
    assert signatures().verify(ident.public_key, b"m", a, b"ctx")
    assert not signatures().verify(ident.public_key, b"m", a, b"other-ctx")
    assert not signatures().verify(ident.public_key, b"m", a[:-1], b"ctx")


# -- zstd payloads -----------------------------------------------------------------------------
def test_compressible_payload_is_zstd_and_round_trips(ident: Identity) -> None:
    payload = bytes(range(16)) * 512  # 8 KiB, very compressible
    msg = submit(ident, payload)
    data = msg.to_frame(compress=True)
    assert decode_frame(data).flags & FLAG_ZSTD
    assert len(data) < len(payload) // 4
    assert decode_message(data) == msg  # digest is over the uncompressed payload
    signed_data = signed(ident, msg)  # signing works on top (compress=False here)
    assert not decode_frame(signed_data).flags & FLAG_ZSTD


def test_incompressible_payload_stays_raw(ident: Identity) -> None:
    msg = submit(ident, os.urandom(4096))
    assert not decode_frame(msg.to_frame(compress=True)).flags & FLAG_ZSTD


def test_zstd_bomb_and_garbage_are_refused(ident: Identity) -> None:
    z = zstd()
    assert z is not None
    bomb = z.compress(b"\x00" * (1 << 20))  # 1 MiB of zeros in a few dozen bytes
    base = submit(ident, b"\x00" * (1 << 20))
    header = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)
              if f.name != "payload"}
    frame = encode_frame(Submit.TYPE, header, bomb, flags=FLAG_ZSTD)
    with pytest.raises(FrameError, match="limit"):
        decode_message(frame, max_payload=64 * 1024)
    whole = decode_message(frame)  # fine under the default
    assert isinstance(whole, Submit)
    assert whole.payload == b"\x00" * (1 << 20)
    garbage = encode_frame(Submit.TYPE, header, b"\x28\xb5\x2f\xfd" + b"junk", flags=FLAG_ZSTD)
    with pytest.raises(FrameError, match="zstd"):
        decode_message(garbage)


def test_seed_and_expanded_keys_sign_the_same_standard() -> None:
    """A seed key (cryptography/OpenSSL) and an expanded key (pqcrypto) each verify under the
    other implementation: one standard, two signers, any verifier."""
    from shared.platform import NativeMLDSA65, PqcryptoMLDSA65

    native, pq = NativeMLDSA65(), PqcryptoMLDSA65()
    for pk, sk in (native.keygen(), pq.keygen()):
        sig = native.sign(sk, b"message", b"run-1")
        assert pq.verify(pk, b"message", sig, b"run-1")
        assert native.verify(pk, b"message", sig, b"run-1")
        assert not pq.verify(pk, b"message", sig, b"run-2")  # the context is bound
        assert not pq.verify(pk, b"messagE", sig, b"run-1")
