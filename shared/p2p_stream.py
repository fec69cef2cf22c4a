"""Streamed p2p reductions (run option `stream_chunk_mb` with transport p2p), sans I/O.

A p2p member's slice of a shard travels in one `Shard` frame, so a shard must fit a frame.
A streamed run cuts the update into more shards than members, none larger than a chunk
(shared.p2p.make_plan's `max_shard`): each shard IS one piece, so the existing per-shard
frames, owners, replicas, checks and re-plans already are the chunked transfer. What the
stream adds (ShardReducer(stream=True), native_node/p2p_send.py):

- every piece is checked on arrival (`check_piece`): typed ForeignChunk (not a member, or a
  shard the receiver does not own), DuplicateChunk (held or already reduced), BadChunk (wrong
  size, not finite); a refused piece changes nothing. Its frame is signed by its sender, as
  every frame (checked by the server on the relay, and on a direct channel the DTLS
  fingerprint the server attested names the sender);
- an owner reduces a shard as soon as every member's piece of it is in, then drops the pieces
  and acknowledges each (Shard kind "ack", payload: the piece's SHA-256, which the sender
  checks against what it sent: `check_ack`);
- a sender keeps at most a window of unacknowledged pieces per owner, so an owner holds at
  most (members - 1) x window pieces besides its own update and the aggregate it must hold;
- pieces in flight on a channel that closes are sent again, in order, from the first not
  acknowledged, over the new path (a reopened channel, else the server's relay); an owner
  acknowledges a resent piece of a shard it has already reduced again (`ack_again`).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from shared.errors import BadChunk, DuplicateChunk, ForeignChunk
from shared.vec import Vector, all_finite, from_bytes, to_bytes

if TYPE_CHECKING:
    from shared.p2p import Plan, ShardReducer

ACK = "ack"  # Shard kind of an owner's receipt of a piece (payload: the piece's SHA-256)
DEFAULT_WINDOW = 4  # unacknowledged pieces a sender keeps in flight per owner


def update_bytes(update: Vector) -> bytes | memoryview:
    """A member's update as float32 LE bytes, without a copy where its buffer already is that
    (a C-contiguous float32 numpy array or array("f") on a little-endian machine)."""
    if sys.byteorder == "little":
        try:
            view = memoryview(update)
            if view.format in ("f", "@f") and view.c_contiguous:
                return view.cast("B")
        except (TypeError, ValueError):
            pass
    return to_bytes(update)


def ack_event(to: str, shard: int, piece: bytes | memoryview) -> dict[str, Any]:
    return {"kind": ACK, "to": to, "shard": shard, "payload": hashlib.sha256(piece).digest()}


def check_piece(plan: Plan, me: str, reduced: Mapping[int, bytes],
                parts: Mapping[int, Mapping[str, Any]], sender: str, shard: int,
                payload: bytes) -> None:
    """A streamed piece's typed refusal, before it touches anything (see the module doc)."""
    if sender not in plan.members:
        raise ForeignChunk(f"piece from {sender[:12]}, not a member of the plan",
                           field="node_id")
    if not 0 <= shard < plan.n_shards or me not in plan.owners[shard]:
        raise ForeignChunk(f"piece of shard {shard}, which this peer does not own",
                           field="shard")
    if shard in reduced or sender in parts.get(shard, {}):
        raise DuplicateChunk(f"piece of shard {shard} from {sender[:12]} was already "
                             "received", field="shard")
    lo, hi = plan.bounds(shard)
    if len(payload) != 4 * (hi - lo):
        raise BadChunk(f"shard {shard} piece has {len(payload)} bytes, not {4 * (hi - lo)}",
                       field="payload")
    if not all_finite(from_bytes(bytes(payload))):
        raise BadChunk(f"shard {shard} piece from {sender[:12]} is not finite",
                       field="payload")


def ack_again(r: ShardReducer, sender: str, shard: int, payload: bytes
              ) -> list[dict[str, Any]]:
    """The receipt of a piece refused as a duplicate of one already reduced (resent after a
    lost channel): acknowledged again, nothing else changes."""
    if r.stream and shard in r.reduced and sender in r.plan.members:
        return [ack_event(sender, shard, payload)]
    return []


def check_ack(r: ShardReducer, owner: str, shard: int, payload: bytes) -> None:
    """An owner's receipt of our piece of `shard`: ForeignChunk unless it owns the shard,
    BadChunk unless it names the SHA-256 of the piece we sent (the caller resends it)."""
    plan = r.plan
    if not 0 <= shard < plan.n_shards or owner not in plan.owners[shard]:
        raise ForeignChunk(f"receipt for shard {shard} from {owner[:12]}, not its owner",
                           field="shard")
    lo, hi = plan.bounds(shard)
    if bytes(payload) != hashlib.sha256(memoryview(r.raw)[4 * lo:4 * hi]).digest():
        raise BadChunk(f"receipt for shard {shard} names another piece than ours",
                       field="payload")
