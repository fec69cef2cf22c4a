"""The server's way out: signing frames, sending them to connections, and the byte counts.

Every frame the server sends is signed with its key (shared.envelope) and counted: per peer,
per round (`round_bytes`, stored with the round) and in total (`bytes_down`). A send to a
socket that has gone is logged, not raised: the peer's disconnect is handled where the socket
closes. Implements server.peers.Nodes for the coordinator's collaborators.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from server.peers import Connection, Peer
from server.runstate import RunState
from server.signer import SigningPool
from shared.envelope import sign_round
from shared.messages import Ack, Message, RoundCommitted

log = logging.getLogger("server.coordinator")


class Outbox:
    def __init__(self, run: RunState, counters: Counter[str]) -> None:
        self.run = run
        self.counters = counters  # bytes_down (and bytes_up, counted as frames arrive)
        self.peers: dict[str, Peer] = {}  # node id -> peer, connected or not
        self.round_bytes = [0, 0]  # up, down during the open round
        # signs per-connection frames off the event loop (server.app sets it; None: in
        # process, as in-memory drivers and tests run the coordinator)
        self.signer: SigningPool | None = None
        # round close -> commit, server side: when the open round took its last update (the
        # moment its Ack was handed here) and, per commit, the ms until RoundCommitted had
        # been handed to every socket (bench.load reads them from /api/run)
        self.last_take = 0.0
        self.commit_ms: list[float] = []

    def frame(self, msg: Message) -> bytes:
        """`msg` signed with the server's key (shared.envelope)."""
        ident = self.run.identity
        assert ident is not None
        return msg.to_frame(sign=ident.signer(
            run_id=self.run.run_id, round_=sign_round(getattr(msg, "round", None)),
            msg_type=msg.TYPE, nonce=msg.nonce))

    async def signed(self, msg: Message) -> bytes:
        """`msg` signed like `frame`, by the signing processes when there are some."""
        return self.frame(msg) if self.signer is None else await self.signer.frame(msg)

    async def send(self, conn: Connection, msg: Message | bytes) -> None:
        if isinstance(msg, Ack) and msg.status == "accepted":
            self.last_take = time.monotonic()
        data = msg if isinstance(msg, bytes) else await self.signed(msg)
        if conn.peer is not None:
            conn.peer.bytes_down += len(data)
        self.round_bytes[1] += len(data)
        self.counters["bytes_down"] += len(data)
        try:
            await conn.ws.send_bytes(data)
        except (ConnectionError, RuntimeError) as exc:
            log.info("send to %s failed: %s", conn.remote, exc)

    def conn(self, node_id: str) -> Connection | None:
        """The connection of a connected node; None when it is unknown or gone."""
        p = self.peers.get(node_id)
        return Connection(ws=p.ws, remote="", peer=p) if p is not None and p.ws else None

    def connected(self, role: str | None = None) -> list[Peer]:
        """Connected peers (of `role`, when given)."""
        return [p for p in self.peers.values()
                if p.ws is not None and (role is None or p.role == role)]

    async def to_all(self, peers: list[Peer], msg: Message | bytes) -> None:
        """The same signed bytes to each of `peers` that is connected."""
        data = msg if isinstance(msg, bytes) else self.frame(msg)
        await asyncio.gather(*(self.send(Connection(ws=p.ws, remote="", peer=p), data)
                               for p in peers if p.ws is not None))
        if isinstance(msg, RoundCommitted) and self.last_take > 0:
            self.commit_ms.append(round(1000 * (time.monotonic() - self.last_take), 1))
            del self.commit_ms[:-1000]
            self.last_take = 0.0
