"""Participants as the coordinator sees them: one Peer per node id, one Connection per socket,
and `Nodes`, the interface through which the coordinator's collaborators reach them."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from shared.messages import Message

PRE_HELLO_REFUSALS = 8  # refused frames before Hello, then the connection is closed
MAX_REFUSALS = 256  # refused frames on one connection, then it is closed


class Sender(Protocol):
    async def send_bytes(self, data: bytes) -> None: ...

    async def close(self) -> Any: ...


@dataclass(eq=False)
class Peer:
    """One participant as the coordinator sees it."""

    node_id: str
    runtime: str
    device: str
    shard: int
    ws: Sender | None  # None when disconnected
    role: str = "trainer"  # trainer | validator
    transport: str = "ws"  # ws | webrtc (star data channel open) | relay (star, fell back)
    features: frozenset[str] = frozenset()  # from its Hello, e.g. "delta-params"
    holds: str | None = None  # digest of the global params this connection was last sent
    has_momentum: bool = False  # p2p: it was sent the outer momentum (it steps itself)
    relayed_bytes: int = 0  # p2p: shard bytes the server forwarded for it (no direct channel)
    # peer node id (or "server") -> the candidate pair type of its connection to it:
    # host / srflx / relay (reported by the node, or the server's own peer), or "server"
    # (the server relayed for it)
    ice_pairs: dict[str, str] = field(default_factory=dict)
    state: str = "idle"  # idle | training | submitted | rejected | validating | gone
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    bytes_up: int = 0
    bytes_down: int = 0
    accepted: int = 0
    rejected: int = 0


@dataclass(eq=False)
class Connection:
    """One WebSocket; `peer` is set once its Hello was accepted."""

    ws: Sender
    remote: str
    peer: Peer | None = None
    bytes_up: int = 0
    challenge: str = field(default_factory=lambda: secrets.token_hex(32))
    errors: int = 0  # frames refused on this connection
    public_key: bytes = b""  # the key the Hello proved possession of


def close_reason(conn: Connection) -> str | None:
    """Why `conn` must be closed now (unsigned), or None. The one refusal limit: checked by
    server.ws for WebSocket frames and by the coordinator for frames that reach it by another
    path (a star data channel)."""
    if conn.peer is None and conn.errors >= PRE_HELLO_REFUSALS:
        return f"{PRE_HELLO_REFUSALS} refused frames before hello"
    if conn.errors >= MAX_REFUSALS:
        return f"{MAX_REFUSALS} refused frames"
    return None


class Nodes(Protocol):
    """What a collaborator of the coordinator (reductions, validation, the RTC hub) needs to
    reach nodes: the peer table, signing, sending. server.outbox.Outbox implements it."""

    @property
    def peers(self) -> Mapping[str, Peer]: ...  # node id -> peer, connected or not

    def frame(self, msg: Message) -> bytes: ...  # `msg` signed by the server

    async def send(self, conn: Connection, msg: Message | bytes) -> None: ...

    def conn(self, node_id: str) -> Connection | None: ...  # None when not connected
