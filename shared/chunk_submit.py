"""The participant's Submit of an update encoded by chunks (shared.chunk_encode), and its
journal entry. Stdlib only.

A driver whose trainer can give its pseudo-gradient a chunk at a time hands
`Participant.submit` a `DeltaSource` instead of the whole Δ's bytes, and sets
`Participant.spool` (a factory of spool files). When the update may be encoded by chunks
(`chunk_encode.refusal` is None) `submit_chunked` checks Δ is finite, encodes it with error
feedback into a fresh spool, hashes the spool into the payload digest and the manifest for
the run's `stream_chunk`, and makes the pending update a `Spooled` one: the driver's
"stream" event hands it to its Sender (shared.stream_up.Sender.start_spooled), which reads
the chunks from the spool. A payload within one chunk goes as a plain Submit, as it would
from the one-shot path. Otherwise the source's whole Δ takes the one-shot path.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from shared.chunk_encode import (
    DeltaSource,
    FileSpool,
    Spooled,
    all_finite,
    digests,
    encode_chunked,
    refusal,
)
from shared.envelope import new_nonce
from shared.messages import Submit

if TYPE_CHECKING:
    from shared.participant import Event, Job, Participant

JOURNAL_VERSION = 1  # shared.participant's
log = logging.getLogger("shared.chunk_submit")


def why_not(part: Participant, job: Job, codec: Any) -> str | None:
    """Why `job`'s update keeps the one-shot path (None: it is encoded by chunks)."""
    w = part.welcome
    assert w is not None
    return refusal(codec, stream_chunk=w.stream_chunk, transport=w.transport,
                   dp=job.dp_clip is not None, secagg=part.secagg is not None,
                   momentum=w.worker_momentum, spool=part.spool is not None)


def submit_chunked(part: Participant, job: Job, codec: Any, source: DeltaSource, *,
                   train_loss: float | None, samples: int, compute_s: float
                   ) -> list[Event] | None:
    """Encode, spool, sign and send `job`'s update (see the module doc). None: no spool
    file could be made (then the caller takes the one-shot path)."""
    from shared.participant import loss_or_none, seconds

    w, make = part.welcome, part.spool
    assert w is not None
    assert make is not None
    if not all_finite(source):  # before the residual is touched, as the one-shot path
        part.training = None
        return [{"kind": "error", "code": "not_finite",
                 "message": f"round {job.round}: training diverged (NaN/inf); not submitted"}]
    try:
        spool = make()
    except OSError as exc:
        log.warning("no spool file (%s): the update is encoded in memory", exc)
        part.counts["chunk_spool_failed"] = part.counts.get("chunk_spool_failed", 0) + 1
        return None
    residual, part.residual = part.residual, None  # given up: the new one is written in it
    try:
        size, part.residual = encode_chunked(codec, source, residual=residual,
                                             error_feedback=w.error_feedback, spool=spool)
        digest, manifest = digests(spool, size, w.stream_chunk)
    except (ValueError, OSError) as exc:
        part.training = None
        spool.remove()
        if isinstance(exc, ValueError):
            return [{"kind": "fatal", "message": f"this node cannot encode codec "
                                                 f"{codec.name}: {exc}"}]
        part.residual = None  # written in part: it starts again from zero, as after a restart
        return [{"kind": "error", "code": "spool_failed",
                 "message": f"round {job.round}: the spool file failed ({exc}); not submitted"}]
    fields = {"run_id": w.run_id, "round": job.round, "node_id": part.node_id,
              "codec": codec.name, "length": source.n, "digest": digest,
              "train_loss": loss_or_none(train_loss), "samples": int(samples),
              "compute_s": seconds(compute_s)}
    old = part.pending
    if isinstance(old, Spooled):
        old.spool.remove()
    part.counts["chunk_encoded"] = part.counts.get("chunk_encoded", 0) + 1
    part.training, part.pending_params = None, job.params_digest
    part.counts["submitted"] += 1
    if size <= w.stream_chunk:  # one chunk: a plain Submit, as the one-shot path sends
        payload = spool.read_at(0, size)
        spool.remove()
        msg = Submit(nonce=new_nonce(), payload=payload, **fields)
        part.pending = msg
        send: Event = {"kind": "send", "msg_type": Submit.TYPE, "frame": part.frame(msg)}
    else:
        part.pending = Spooled(size=size, chunk_bytes=w.stream_chunk, manifest=manifest,
                               spool=spool, **fields)
        send = {"kind": "stream", "update": part.pending}
    return [{"kind": "journal", "entry": part.journal_entry()}, send,
            *part.ahead.after_submit(job.round)]


def journal_entry(up: Spooled, params_digest: str | None) -> str:
    """A spooled update's journal entry: its fields and where its spool lies."""
    fields = {k: getattr(up, k) for k in ("run_id", "round", "node_id", "codec", "length",
                                          "digest", "size", "chunk_bytes", "train_loss",
                                          "samples", "compute_s")}
    return json.dumps({"version": JOURNAL_VERSION, "params_digest": params_digest,
                       "spooled": fields, "spool": up.spool.path,
                       "manifest": up.manifest.hex()})


def restore(doc: dict[str, Any]) -> Spooled | None:
    """A journaled spooled update, its spool file checked against its digest and manifest
    (None when gone or changed)."""
    fields = doc["spooled"]
    try:
        spool = FileSpool(str(doc["spool"]), create=False)
    except OSError:
        return None
    up = Spooled(manifest=bytes.fromhex(doc["manifest"]), spool=spool, **fields)
    if spool.size() != up.size or digests(spool, up.size, up.chunk_bytes) != \
            (up.digest, up.manifest):
        return None
    return up

