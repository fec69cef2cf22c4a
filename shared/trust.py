"""Which server a participant believes: every frame from it must be signed by the key its
Challenge presented, and that key is pinned per run (trust on first use, or a required id).

Stdlib only: native nodes keep the pins in a JSON file (native_node.pins), browser tabs in
localStorage; both hand this class a dict and a callback that persists it.
"""

from __future__ import annotations

from collections.abc import Callable

from shared.envelope import ReplayGuard, node_id_of, verify_frame
from shared.errors import BadSignature, MessageError
from shared.frame import decode_frame
from shared.messages import Challenge, Message, message_from_frame


class UntrustedServer(Exception):
    """The server's key is not the one pinned for this run (or not the one required)."""


class ServerTrust:
    def __init__(self, *, pins: dict[str, str] | None = None,
                 save_pins: Callable[[dict[str, str]], None] | None = None,
                 expected_server_id: str | None = None, max_payload: int) -> None:
        self.pins = dict(pins or {})  # run id -> server id
        self.save_pins = save_pins
        self.expected = expected_server_id
        self.max_payload = max_payload
        self.key: bytes | None = None
        self.run_id: str | None = None
        self.replays = ReplayGuard()

    def reset(self) -> None:
        """A new connection: the next frame must be a Challenge."""
        self.key, self.run_id = None, None
        self.replays = ReplayGuard()

    @property
    def server_id(self) -> str | None:
        return node_id_of(self.key) if self.key is not None else None

    def open(self, data: bytes) -> Message:
        """Verify and decode one frame from the server. ProtocolError: drop the frame;
        UntrustedServer: stop talking to this server."""
        frame = decode_frame(data, max_payload=self.max_payload)
        if self.key is None:
            if frame.msg_type != Challenge.TYPE:
                raise MessageError("the server must open with a Challenge", field="msg_type")
            challenge = message_from_frame(frame, max_payload=self.max_payload)
            assert isinstance(challenge, Challenge)
            key = bytes.fromhex(challenge.server_public_key)
            verify_frame(frame, public_key=key, run_id=challenge.run_id,
                         node_id=node_id_of(key))
            self._check_pin(challenge.run_id, node_id_of(key))
            self.key, self.run_id = key, challenge.run_id
            return challenge
        assert self.run_id is not None
        if frame.msg_type == Challenge.TYPE:
            raise BadSignature("a second Challenge on one connection", field="msg_type")
        nonce = verify_frame(frame, public_key=self.key, run_id=self.run_id,
                             node_id=node_id_of(self.key))
        self.replays.check_and_remember(node_id_of(self.key), nonce)
        return message_from_frame(frame, max_payload=self.max_payload)

    def _check_pin(self, run_id: str, server_id: str) -> None:
        if self.expected is not None and server_id != self.expected:
            raise UntrustedServer(f"server id {server_id} is not the required {self.expected}")
        pinned = self.pins.get(run_id)
        if pinned is not None and pinned != server_id:
            raise UntrustedServer(
                f"run {run_id} was served by {pinned[:16]}..., now by {server_id[:16]}...: "
                f"refusing (forget the pinned key if the change is expected)")
        if pinned is None:
            self.pins[run_id] = server_id
            if self.save_pins is not None:
                self.save_pins(dict(self.pins))
