"""Pending-update journal: an update survives a crash of the node that trained it.

Before a node sends its Submit for round r it writes the update to `<state dir>/pending.bin`
(temp file + fsync + rename + fsync of the folder: a crash leaves the old file or the new one,
never half of one). When the restarted node sees a RoundOpen for the same run, round and
params digest, it resubmits that update instead of training the round again: the server
counts it once whatever happened before the crash (its idempotency key is (run, round, node,
payload digest)). A RoundCommitted that covers the round clears the file; an entry for any
other round or params is stale and is dropped when the next round opens.

File layout: the 8-byte magic b"DAAPJNL1", a 4-byte little-endian header length, a UTF-8 JSON
header (run_id, params_digest and every Submit field except the payload), then the payload.
The Submit's own check (sha256 of the payload == digest) catches a damaged payload. The nonce
is not kept: every send is signed afresh with a new nonce.

A corrupt or unreadable file raises JournalError from `load`; `recover` turns that into a log
line and ignores the file (a node must never refuse to start over its journal).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ProtocolError
from shared.messages import Submit

log = logging.getLogger("native_node.journal")
MAGIC = b"DAAPJNL1"
FILENAME = "pending.bin"
_LEN = struct.Struct("<I")
MAX_HEADER = 64 * 1024


class JournalError(Exception):
    """The journal file exists but cannot be used (truncated, wrong magic, bad fields)."""


@dataclass(frozen=True, kw_only=True)
class Entry:
    params_digest: str  # digest of the global params the update was trained from
    submit: Submit  # the update as it was (to be) sent; re-signed with a fresh nonce

    @property
    def round(self) -> int:
        return self.submit.round


def path_of(state_dir: Path) -> Path:
    return Path(state_dir) / FILENAME


def encode(entry: Entry) -> bytes:
    fields = {f.name: getattr(entry.submit, f.name) for f in dataclasses.fields(entry.submit)
              if f.name not in ("payload", "nonce")}
    header = json.dumps({"params_digest": entry.params_digest, "submit": fields},
                        sort_keys=True).encode()
    return MAGIC + _LEN.pack(len(header)) + header + entry.submit.payload


def decode(blob: bytes) -> Entry:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + _LEN.size:
        raise JournalError("not a pending-update journal (bad magic or truncated)")
    (n,) = _LEN.unpack_from(blob, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if n > MAX_HEADER or start + n > len(blob):
        raise JournalError(f"truncated journal (header of {n} bytes, file of {len(blob)})")
    try:
        head = json.loads(blob[start:start + n])
        fields = dict(head["submit"])
        submit = Submit(**fields, payload=bytes(blob[start + n:]))
        params = head["params_digest"]
        if not isinstance(params, str):
            raise TypeError("params_digest is not a string")
    except (ValueError, KeyError, TypeError, ProtocolError) as exc:
        raise JournalError(f"damaged journal: {exc}") from exc
    return Entry(params_digest=params, submit=submit)


def save(state_dir: Path, entry: Entry) -> None:
    """Write atomically: temp file, fsync, rename, fsync of the folder."""
    path = path_of(state_dir)
    tmp = path.with_name(f".{FILENAME}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(encode(entry))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load(state_dir: Path) -> Entry | None:
    """The journaled entry, None when there is none; JournalError when it is unusable."""
    try:
        blob = path_of(state_dir).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise JournalError(f"cannot read the journal: {exc}") from exc
    return decode(blob)


def clear(state_dir: Path) -> None:
    """Remove the journal; a failure is logged, never raised (the node carries on)."""
    path = path_of(state_dir)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove the pending-update journal %s: %s", path, exc)


def recover(state_dir: Path, node_id: str) -> Entry | None:
    """At start: the journaled entry of this node, or None (a bad file is logged, removed)."""
    try:
        entry = load(state_dir)
    except JournalError as exc:
        log.warning("ignoring the pending-update journal %s: %s", path_of(state_dir), exc)
        clear(state_dir)
        return None
    if entry is None:
        return None
    if entry.submit.node_id != node_id:
        log.warning("ignoring the pending-update journal: it belongs to node %s",
                    entry.submit.node_id[:12])
        clear(state_dir)
        return None
    log.info("journal: an update for round %d survived the restart; the error-feedback "
             "residual did not (it starts again from zero)", entry.round)
    return entry


def matching(entry: Entry, *, run_id: str, round: int, params_digest: str,
             state_dir: Path) -> Submit | None:
    """The journaled Submit if it belongs to this open round; else drop the stale file."""
    s = entry.submit
    if s.run_id == run_id and s.round == round and entry.params_digest == params_digest:
        return s
    log.info("journal: the update for round %d is stale (round %d is open); dropped",
             s.round, round)
    clear(state_dir)
    return None
