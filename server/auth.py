"""Who sent a frame: signature, challenge and identity checks on the raw frame (before its
payload is inflated or decoded). Pure: the caller keeps the connection state and the replay
guard."""

from __future__ import annotations

from shared.envelope import verify_frame
from shared.errors import BadSignature, MessageError, UnknownNode, WrongRun
from shared.frame import Frame
from shared.messages import (
    MESSAGE_TYPES,
    Dht,
    Hello,
    ParamsFetch,
    Ready,
    SecAgg,
    Shard,
    Signal,
    StreamSubmit,
    Submit,
    Verdict,
)


def authenticate(frame: Frame, *, run_id: str, challenge: str, peer_id: str | None,
                 peer_key: bytes) -> tuple[str, str, bytes]:
    """(node id, nonce, public key) of a frame a node sent, or a typed error.

    `peer_id` / `peer_key`: what this connection's Hello proved (None / b"" before it)."""
    header = frame.header
    if frame.msg_type == Hello.TYPE:
        if peer_id is not None:
            raise MessageError("hello was already sent on this connection", field="msg_type")
        key_hex, node_id = header.get("public_key"), header.get("node_id")
        if not isinstance(key_hex, str) or not isinstance(node_id, str):
            raise MessageError("hello needs public_key and node_id", field="public_key")
        try:
            public_key = bytes.fromhex(key_hex)
        except ValueError:
            raise MessageError("public_key is not hex", field="public_key") from None
        if header.get("challenge") != challenge:
            raise BadSignature("hello does not answer this connection's challenge "
                               "(a replayed hello?)", field="challenge")
        nonce = verify_frame(frame, public_key=public_key, run_id=run_id, node_id=node_id)
        return node_id, nonce, public_key
    if frame.msg_type in (Submit.TYPE, Verdict.TYPE, Signal.TYPE, Ready.TYPE, Shard.TYPE,
                          SecAgg.TYPE, Dht.TYPE, StreamSubmit.TYPE, ParamsFetch.TYPE):
        what = MESSAGE_TYPES[frame.msg_type].__name__
        for name in ("node_id", "run_id", "nonce"):
            if not isinstance(header.get(name), str):
                raise MessageError(f"{what}: missing field {name!r}", field=name)
        if peer_id is None:
            raise UnknownNode(f"send hello before {what}", field="node_id")
        if header.get("node_id") != peer_id:
            raise UnknownNode("node_id does not match this connection's hello",
                              field="node_id")
        if header.get("run_id") != run_id:
            raise WrongRun(f"update is for run {header.get('run_id')!r}; this is run "
                           f"{run_id!r}", field="run_id")
        nonce = verify_frame(frame, public_key=peer_key, run_id=run_id, node_id=peer_id)
        return peer_id, nonce, peer_key
    name = getattr(MESSAGE_TYPES.get(frame.msg_type), "__name__", str(frame.msg_type))
    raise MessageError(f"{name} is not sent to the server", field="msg_type")
