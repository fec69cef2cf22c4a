"""Streamed masked updates (run config `secagg` with `stream_chunk_mb`): each verified chunk's
words go into the round's masked sum as they arrive, so the server holds the sum and one
chunk, whatever the number of participants (docs/protocol.md, "Streamed updates").

A masked update is a Submit of codec `secagg` whose payload is a u32 header length, the
signed MaskedUpdate header (JSON: node, round, offset, length, the words' SHA-256) and the
u32 words (shared.secagg.round.pack_masked). Larger than a chunk, it travels as any update
does (shared.stream_up, server.streams: a signed StreamSubmit with the chunks' SHA-256
manifest, then Chunks, each checked against it on arrival and written to the spool). Here,
per transfer (`Progress`), after each accepted chunk the verified prefix of the payload not
yet consumed is read back from the transfer's file:

- the header, once complete, is checked as `SecAggAggregator.on_masked` checks a whole
  masked update (sender in the masking set and not yet in the sum, ring, offset and length,
  signature; the payload's size must be header + 4 x length), before any word is added;
- then the words are added into `agg.sum` (mod 2^32) in order, hashed on the way.

When the last chunk is in (server.streams checked the payload's digest), the words' SHA-256
must be the header's; then the update is taken by the round collection like a one-frame
masked update (same guards) and its sender joins `agg.submitted`. Any failure before that
(a bad header or digest, a transfer replaced, dropped or left unfinished when the round
unmasks, a refusal by the collection) subtracts exactly the words that were added (read back
from the same file: addition mod 2^32 is undone exactly), so the sum only ever holds the
updates of `agg.submitted`: never a wrong sum. A bad header or digest also excludes the
sender for the round (as a bad one-frame masked update does); the unmasking is unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.errors import BadUpdate, ProtocolError
from shared.messages import Submit
from shared.secagg import SecAggAggregator, SecAggError
from shared.secagg.errors import BadMaskedUpdate
from shared.secagg.messages import MaskedUpdate
from shared.secagg.round import MAX_HEADER, SECAGG_CODEC, unpack_masked

if TYPE_CHECKING:
    from server.peers import Peer
    from server.secagg_round import SecAggReduction
    from server.streams import StreamIntake, Transfer
    from shared.messages import StreamSubmit

log = logging.getLogger("server.secagg")
READ = 4 * 2**20  # bytes read back from a transfer's file at a time (undo)
SIZE_SLACK = 4 + MAX_HEADER  # a masked payload's bytes beyond its words, at most


@dataclass(frozen=True, kw_only=True, slots=True)
class SummedSubmit(Submit):
    """A complete streamed masked update as the round collection takes it: its words are in
    the masked sum already, its `payload` is empty (no message type of its own: it is never
    a frame); the fields are its StreamSubmit's, whose digest server.streams checked."""

    def __post_init__(self) -> None:
        """The StreamSubmit's fields were checked; the digest is the streamed payload's."""


@dataclass
class Progress:
    """One streamed masked update's words in the sum so far."""

    owner: SecAggReduction  # the session whose sum it is (the run's, or a group's)
    agg: SecAggAggregator  # the sum they go into (a retry's fresh keys make a new one)
    key: tuple[int, str]  # (round, digest) of the transfer
    consumed: int = 0  # payload bytes consumed (header, then words)
    head: bytearray = field(default_factory=bytearray)  # the header, until complete
    start: int = 0  # payload offset of the first word (once the header is in)
    header: MaskedUpdate | None = None
    carry: bytes = b""  # the first bytes of a word split across chunks
    added: int = 0  # words added into agg.sum (words 0 .. added-1)
    sha: Any = field(default_factory=hashlib.sha256)  # of the words consumed


class MaskedStreams:
    """server.streams' watcher in a secagg run (see the module doc)."""

    def __init__(self, reduction: SecAggReduction, intake: StreamIntake) -> None:
        self.reduction, self.intake = reduction, intake
        self.progress: dict[str, Progress] = {}  # node id -> its open masked transfer
        self._taking: tuple[str, str] | None = None  # (node, digest) being taken now
        self.counters = reduction.counters  # secagg_stream_words_undone, ...
        reduction.streamed = self

    # -- server.streams' hooks ----------------------------------------------------------
    def opened(self, node_id: str, msg: StreamSubmit) -> None:
        """A StreamSubmit: refused (typed error) unless the round takes masked updates now."""
        if msg.codec != SECAGG_CODEC:
            raise BadUpdate(f"this run aggregates securely: codec must be {SECAGG_CODEC!r}",
                            field="codec")
        owner = self.reduction.session(node_id, msg.round)
        agg = owner.agg
        if agg is None or owner.stage != "masking" or msg.round != agg.cfg.round:
            raise SecAggError(f"round {msg.round} takes no masked updates now (stage "
                              f"{owner.stage})", field="round")
        if node_id not in agg.masking or node_id in agg.excluded or node_id in agg.submitted:
            raise SecAggError("not expecting a masked update from this node", field="node_id")

    def advance(self, node_id: str, t: Transfer) -> None:
        """Consume the transfer's verified prefix: the header (checked), then the words (into
        the sum). A ProtocolError leaves the sum as it was before this transfer."""
        p = self.progress.get(node_id)
        if p is None or p.key != t.key:
            owner = self.reduction.session(node_id, t.msg.round)
            agg = owner.agg
            if agg is None or owner.stage != "masking" or t.msg.round != agg.cfg.round:
                raise SecAggError(f"round {t.msg.round} takes no masked updates now (stage "
                                  f"{owner.stage})", field="round")
            self.dropped(node_id)  # (server.streams dropped a replaced transfer already)
            p = self.progress[node_id] = Progress(owner=owner, agg=agg, key=t.key)
        end = min(t.msg.size, t.reassembly.next * t.msg.chunk_bytes)
        try:
            while p.consumed < end:
                take = min(end - p.consumed, READ)
                t.fh.flush()
                t.fh.seek(p.consumed)
                data = t.fh.read(take)
                p.consumed += len(data)
                self._consume(node_id, t, p, data)
        except ProtocolError as exc:
            self.dropped(node_id)
            if isinstance(exc, SecAggError):
                self.reduction.counters[f"secagg_{exc.code.removeprefix('secagg_')}"] += 1
            raise

    def _consume(self, node_id: str, t: Transfer, p: Progress, data: bytes) -> None:
        while p.header is None and data:
            want = 4 if len(p.head) < 4 else 4 + struct.unpack_from("<I", p.head)[0]
            k = want - len(p.head)
            p.head += data[:k]
            data = data[k:]
            (n,) = struct.unpack_from("<I", p.head.ljust(4, b"\0"))
            if len(p.head) >= 4 and n > MAX_HEADER:
                raise p.agg._exclude(node_id, BadMaskedUpdate(
                    "masked update header length out of range", field="payload"))
            if len(p.head) == 4 + n:
                p.header = self._header(node_id, t, p)
        if not data:
            return
        words = p.carry + data
        whole = len(words) - len(words) % 4
        p.carry = words[whole:]
        if whole:
            block = np.frombuffer(words, dtype="<u4", count=whole // 4)
            p.sha.update(memoryview(words)[:whole])
            seg = p.agg.sum[p.added:p.added + len(block)]
            np.add(seg, block, out=seg)
            p.added += len(block)

    def _header(self, node_id: str, t: Transfer, p: Progress) -> MaskedUpdate:
        mu = unpack_masked(bytes(p.head))
        msg = t.msg
        if (mu.node_id, mu.round, mu.run_id) != (node_id, msg.round, msg.run_id):
            raise p.agg._exclude(node_id, BadMaskedUpdate(
                "masked update of another node or round", field="node_id"))
        p.start = len(p.head)
        p.agg.check_masked(mu, payload_len=msg.size - p.start)
        return mu

    def complete(self, peer: Peer, t: Transfer) -> Any:
        """The last chunk is in and the payload hashes to its digest: the words' SHA-256
        must be the header's; then the round collection takes the update (its Outcome)."""
        node_id, msg = peer.node_id, t.msg
        p = self.progress.get(node_id)
        if p is None or p.key != t.key:  # every chunk went through advance: cannot happen
            raise BadUpdate("the streamed masked update was not summed", field="digest")
        if p.header is None or p.carry or p.added != p.header.length \
                or p.sha.hexdigest() != p.header.payload_sha256:
            self.dropped(node_id)
            exc = p.agg._exclude(node_id, BadMaskedUpdate(
                "payload digest or signature does not verify", field="signature"))
            p.owner._count(exc, node_id, msg.round)
            raise exc
        submit = SummedSubmit(run_id=msg.run_id, round=msg.round, node_id=msg.node_id,
                        nonce=msg.nonce, codec=msg.codec, length=msg.length, digest=msg.digest,
                        train_loss=msg.train_loss, samples=msg.samples,
                        compute_s=msg.compute_s, payload=b"")
        self._taking = (node_id, msg.digest)
        try:
            collection = self.intake.coord.collection
            outcome = collection.take(peer, submit)
            row = collection.rows.get(node_id)
            if row is not None and row.digest == msg.digest:
                collection.rows[node_id] = dataclasses.replace(row, bytes=msg.size)
        finally:
            self._taking = None
            self.dropped(node_id)  # a no-op once vector() took it
        return outcome

    def take(self, msg: Submit) -> bool:
        """SecAggReduction.vector's hook: whether `msg` is the streamed update being taken
        now (then its sender joins the sum's submitters)."""
        if not isinstance(msg, SummedSubmit):
            return False
        if self._taking != (msg.node_id, msg.digest):  # cannot come from a node: not a frame
            raise BadUpdate("a summed update that is not being taken", field="digest")
        p = self.progress.pop(msg.node_id)
        if p.agg is not p.owner.agg:
            raise SecAggError("the round was re-keyed while the update streamed in",
                              field="round")
        p.agg.submitted.append(msg.node_id)
        return True

    def dropped(self, node_id: str) -> None:
        """The node's open transfer goes (replaced, refused, unfinished): its words out."""
        p = self.progress.pop(node_id, None)
        if p is None or not p.added or p.agg is not p.owner.agg:
            return
        t = self.intake.transfers.get(node_id)
        if t is None or t.key != p.key:  # a bug: the words cannot come out; the round retries
            log.error("round %d: the words of %s's streamed masked update cannot be taken out "
                      "of the sum (its file is gone): the round is retried with fresh keys",
                      p.agg.cfg.round, node_id[:12])
            self.counters["secagg_stream_sum_lost"] += 1
            p.owner.agg, p.owner.stage = None, "idle"
            return
        start, left, done = p.start, p.added, 0
        while left:
            k = min(left, READ // 4)
            t.fh.flush()
            t.fh.seek(start + 4 * done)
            block = np.frombuffer(t.fh.read(4 * k), dtype="<u4")
            seg = p.agg.sum[done:done + k]
            np.subtract(seg, block, out=seg)
            done, left = done + k, left - k
        self.counters["secagg_stream_words_undone"] += p.added
        log.info("took %d streamed masked words of %s back out of the sum", p.added,
                 node_id[:12])

    def before_unmask(self) -> None:
        """The round unmasks: every unfinished transfer's words leave the sum (and the
        transfer goes: the sum is fixed from here on)."""
        for node_id in list(self.progress):
            self.intake._drop(node_id, "the round unmasks without it")
