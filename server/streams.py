"""Streamed updates at the server (docs/protocol.md, "Streamed updates").

A node whose update is larger than the run's `stream_chunk_mb` sends a signed `StreamSubmit`
(the Submit's fields and the chunks' SHA-256 manifest) and then unsigned `Chunk`s. Per node
there is one open transfer, keyed by (round, digest): a `StreamSubmit` for it again (after a
reconnect) is answered with `Resume` at the first chunk not yet verified; one for another
update replaces it. Each chunk is checked against the manifest on arrival and written to the
transfer's partial file in the spool (server.spool); a refused chunk (shared.stream's typed
errors, or `foreign_chunk` for an update no transfer of its sender has) is answered with an
Error, logged and counted by the coordinator, and changes nothing. When the last chunk is in,
the file is checked against `digest`, decoded once into memory, taken by the round collection
like any `Submit` (same guards) and stored back in the spool as a memmap: the round holds no
update in memory. The round's spool files go when it commits.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.peers import Connection
from server.secagg_stream import SIZE_SLACK, MaskedStreams
from server.spool import Spool
from shared.errors import BadUpdate, ForeignChunk, ProtocolError
from shared.frame import Frame
from shared.messages import Ack, Chunk, Resume, StreamSubmit, Submit, message_from_frame
from shared.stream import Reassembly

if TYPE_CHECKING:
    from server.coordinator import Coordinator

log = logging.getLogger("server.streams")
HASH_BLOCK = 4 * 2**20  # bytes read at a time to check a complete transfer's digest


@dataclass
class Transfer:
    """One node's open streamed update."""

    msg: StreamSubmit  # the signed announcement (fields, manifest)
    path: Any  # its partial file in the spool
    fh: Any  # that file, open for writing
    reassembly: Reassembly

    @property
    def key(self) -> tuple[int, str]:
        return self.msg.round, self.msg.digest


class StreamIntake:
    """The coordinator's receiver of streamed updates (one per run with stream_chunk_mb)."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.spool = Spool(coord.run.store.dir / "spool")
        self.transfers: dict[str, Transfer] = {}  # node id -> its open transfer
        # stream_started, stream_resumed, stream_completed, stream_submits, stream_chunks
        self.counters = coord.counters
        coord.commit_hooks.append(self.after_commit)
        # secagg: masked words go into the masked sum as their chunks arrive
        self.watcher = MaskedStreams(coord.secagg, self) if coord.secagg is not None else None

    # -- announcements -------------------------------------------------------------------
    async def on_start(self, conn: Connection, msg: StreamSubmit) -> None:
        """A signed StreamSubmit: open (or resume) the node's transfer; answer Resume."""
        peer = conn.peer
        assert peer is not None  # authenticated
        coord = self.coord
        self.counters["stream_submits"] += 1  # on either path (server.rtc counts its own)
        state = coord.collection.state
        if msg.length != coord.run.n_params:
            raise BadUpdate(f"wrong shape: update has {msg.length} values, the model has "
                            f"{coord.run.n_params}", field="length")
        if msg.size > 4 * coord.run.n_params + 4096 + (SIZE_SLACK if self.watcher else 0):
            raise BadUpdate(f"a streamed update of {msg.size} bytes is larger than any "
                            "encoding of this model's update", field="size")
        if state is None or msg.round > state.round:
            raise BadUpdate(f"no open round {msg.round} to stream an update for",
                            field="round")
        if state.updates.get(peer.node_id) == msg.digest:  # taken already: say so again
            coord.counters["duplicates"] += 1
            await coord.send(conn, Ack(round=msg.round, digest=msg.digest, status="duplicate"))
            return
        if self.watcher is not None:
            self.watcher.opened(peer.node_id, msg)
        old = self.transfers.get(peer.node_id)
        if old is not None and old.key == (msg.round, msg.digest) \
                and old.msg.payload == msg.payload and old.msg.size == msg.size \
                and old.msg.chunk_bytes == msg.chunk_bytes:
            start = old.reassembly.resume()
            old.msg = msg
            self.counters["stream_resumed"] += 1
            log.info("resuming the streamed update of %s for round %d at chunk %d of %d",
                     peer.node_id[:12], msg.round, start, old.reassembly.n)
        else:
            if old is not None:
                self._drop(peer.node_id, "replaced by another update")
            path = self.spool.part_path(peer.node_id, msg.round, msg.digest)
            fh = self.spool.open_part(path, msg.size)

            def sink(offset: int, data: bytes | memoryview, fh: Any = fh) -> None:
                fh.seek(offset)
                fh.write(data)

            self.transfers[peer.node_id] = Transfer(
                msg=msg, path=path, fh=fh,
                reassembly=Reassembly(size=msg.size, chunk_bytes=msg.chunk_bytes,
                                      manifest=msg.payload, sink=sink))
            start = 0
            self.counters["stream_started"] += 1
            log.info("streamed update from %s for round %d: %d bytes in %d chunks",
                     peer.node_id[:12], msg.round, msg.size,
                     self.transfers[peer.node_id].reassembly.n)
        await coord.send(conn, Resume(round=msg.round, digest=msg.digest, next=start))

    # -- chunks --------------------------------------------------------------------------
    async def on_chunk(self, conn: Connection, frame: Frame) -> None:
        """An unsigned Chunk frame on an authenticated connection; refusals are the
        coordinator's (Error to the sender, log line, counter)."""
        coord = self.coord
        self.counters["stream_chunks"] += 1  # on either path (server.rtc counts its own)
        round_ = frame.header.get("round") if isinstance(frame.header.get("round"), int) \
            else None
        try:
            if conn.peer is None:
                from shared.errors import UnknownNode

                raise UnknownNode("send hello before a Chunk", field="node_id")
            msg = message_from_frame(frame, max_payload=coord.max_payload)
            assert isinstance(msg, Chunk)
            done = self._take_chunk(conn.peer.node_id, msg)
            if done is not None:
                await self._complete(conn, done)
        except ProtocolError as err:
            await coord.reject(conn, err, round_)

    def _take_chunk(self, node_id: str, msg: Chunk) -> Transfer | None:
        t = self.transfers.get(node_id)
        if t is None or t.key != (msg.round, msg.digest):
            raise ForeignChunk(f"no streamed update (round {msg.round}, digest "
                               f"{msg.digest[:12]}) was announced by this node", field="digest")
        t.reassembly.accept(msg.index, msg.payload)
        if self.watcher is not None:
            try:
                self.watcher.advance(node_id, t)
            except ProtocolError as err:
                self._drop(node_id, f"refused: {err.message}")
                raise
        return t if t.reassembly.complete else None

    async def _complete(self, conn: Connection, t: Transfer) -> None:
        """The last chunk is in: check the digest, take the update, spool its vector."""
        assert conn.peer is not None
        node_id, msg = conn.peer.node_id, t.msg
        t.fh.flush()
        t.fh.seek(0)
        h = hashlib.sha256()
        while block := t.fh.read(HASH_BLOCK):
            h.update(block)
        if h.hexdigest() != msg.digest:  # every chunk matched a manifest that lied
            self._drop(node_id, "its payload does not hash to its digest")
            raise BadUpdate("the streamed payload does not hash to its digest", field="digest")
        if self.watcher is not None:  # secagg: the words are in the masked sum already
            try:
                outcome = self.watcher.complete(conn.peer, t)
                self.counters["stream_completed"] += 1
            finally:
                self._drop(node_id, "complete")
            await self._acked(conn, msg, outcome)
            return
        self.transfers.pop(node_id, None)
        t.fh.seek(0)
        payload = t.fh.read()
        t.fh.close()
        os.unlink(t.path)
        self.counters["stream_completed"] += 1
        submit = Submit(run_id=msg.run_id, round=msg.round, node_id=msg.node_id,
                        nonce=msg.nonce, codec=msg.codec, length=msg.length, digest=msg.digest,
                        train_loss=msg.train_loss, samples=msg.samples,
                        compute_s=msg.compute_s, payload=payload)
        del payload
        collection = self.coord.collection
        outcome = collection.take(conn.peer, submit)
        vec = collection.vectors.get(node_id)
        if vec is not None and not hasattr(vec, "filename"):  # to disk: memory stays bounded
            collection.vectors[node_id] = self.spool.store_vector(node_id, msg.round, vec)
        collection.payloads.pop(node_id, None)  # not kept (server.validation scores its file)
        del submit, vec  # not held across the await below: other transfers complete meanwhile
        await self._acked(conn, msg, outcome)

    async def _acked(self, conn: Connection, msg: StreamSubmit, outcome: Any) -> None:
        log.info("streamed update from %s for round %d complete (%s)", msg.node_id[:12],
                 msg.round, outcome.value)
        await self.coord.send(conn, Ack(round=msg.round, digest=msg.digest,
                                        status=outcome.value))
        self.coord._wake.set()

    # -- housekeeping --------------------------------------------------------------------
    def _drop(self, node_id: str, why: str) -> None:
        if self.watcher is not None:  # its masked words out of the sum, from its file
            self.watcher.dropped(node_id)
        t = self.transfers.pop(node_id, None)
        if t is None:
            return
        t.fh.close()
        with contextlib.suppress(OSError):
            os.unlink(t.path)
        log.info("dropped the streamed transfer of %s for round %d: %s", node_id[:12],
                 t.msg.round, why)

    def after_commit(self, record: dict[str, Any]) -> None:
        """The round committed: its spooled vectors and older transfers go."""
        round_ = int(record.get("round", -1))
        for node_id, t in list(self.transfers.items()):
            if t.msg.round <= round_:
                self._drop(node_id, f"round {round_} committed")
        open_parts = {t.path for t in self.transfers.values()}
        gone = self.spool.clear(keep=lambda p: p in open_parts)
        log.info("round %d committed: %d spool file(s) deleted", round_, gone)


def stream_view(counters: Counter[str]) -> dict[str, int]:
    """/api/run's `stream`: transfers started / resumed / completed, and their frames by path
    (announcements and chunks in all, and those that came over star data channels)."""
    view = {k.removeprefix("stream_"): n for k, n in sorted(counters.items())
            if k.startswith("stream_")}
    for kind in ("submits", "chunks"):
        view.setdefault(kind, 0)
        view.setdefault(f"{kind}_rtc", 0)
        view[f"{kind}_ws"] = view[kind] - view[f"{kind}_rtc"]
    return view
