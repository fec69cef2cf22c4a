"""A node trusts only frames signed by its run's pinned server key."""

from __future__ import annotations

from pathlib import Path

import pytest

from native_node import pins
from shared.envelope import Identity, sign_round
from shared.errors import BadSignature, MessageError, Replay
from shared.messages import Ack, Challenge, Message, sha256_hex
from shared.trust import ServerTrust as _Trust
from shared.trust import UntrustedServer

RUN = "run-trust"


def signed(server: Identity, msg: Message, run_id: str = RUN) -> bytes:
    return msg.to_frame(sign=server.signer(run_id=run_id,
                                           round_=sign_round(getattr(msg, "round", None)),
                                           msg_type=msg.TYPE, nonce=msg.nonce))


def challenge(server: Identity, run_id: str = RUN) -> Challenge:
    return Challenge(run_id=run_id, challenge="ab" * 32,
                     server_public_key=server.public_key.hex(), protocol_version=1, agent="t")


def ack() -> Ack:
    return Ack(round=1, digest=sha256_hex(b"x"), status="accepted")


def ServerTrust(state_dir: Path, *, expected_server_id: str | None = None,
                max_payload: int) -> _Trust:
    """A node's trust as the native node builds it: pins kept in state_dir/servers.json."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return _Trust(pins=pins.load(state_dir), save_pins=lambda p: pins.save(state_dir, p),
                  expected_server_id=expected_server_id, max_payload=max_payload)


@pytest.fixture(scope="module")
def servers() -> tuple[Identity, Identity]:
    return Identity.generate(), Identity.generate()


def test_verified_frames_pass_and_bad_ones_are_dropped(tmp_path: Path,
                                                       servers: tuple[Identity, Identity]) -> None:
    good, evil = servers
    trust = ServerTrust(tmp_path, max_payload=1 << 20)
    with pytest.raises(MessageError, match="Challenge"):
        trust.open(signed(good, ack()))  # nothing before the challenge
    assert isinstance(trust.open(signed(good, challenge(good))), Challenge)
    assert trust.server_id == good.node_id
    data = signed(good, ack())
    assert isinstance(trust.open(data), Ack)
    with pytest.raises(Replay):
        trust.open(data)
    with pytest.raises(BadSignature):
        trust.open(signed(evil, ack()))  # someone else's key
    with pytest.raises(BadSignature):
        trust.open(ack().to_frame())  # unsigned
    tampered = bytearray(signed(good, ack()))
    tampered[30] ^= 1
    with pytest.raises((BadSignature, MessageError)):
        trust.open(bytes(tampered))
    with pytest.raises(BadSignature):
        trust.open(signed(good, challenge(good)))  # a second challenge


def test_server_key_is_pinned_per_run(tmp_path: Path,
                                      servers: tuple[Identity, Identity]) -> None:
    good, evil = servers
    ServerTrust(tmp_path, max_payload=1 << 20).open(signed(good, challenge(good)))
    again = ServerTrust(tmp_path, max_payload=1 << 20)
    with pytest.raises(UntrustedServer, match="refusing"):
        again.open(signed(evil, challenge(evil)))  # same run, another key
    again.reset()
    other_run = challenge(evil, run_id="run-other")
    assert isinstance(again.open(signed(evil, other_run, "run-other")), Challenge)
    required = ServerTrust(tmp_path / "x", expected_server_id=good.node_id,
                           max_payload=1 << 20)
    with pytest.raises(UntrustedServer, match="not the required"):
        required.open(signed(evil, challenge(evil, run_id="run-3"), "run-3"))
