"""The native node's pending-update journal file: the participant's entry, kept across a crash.

shared.participant.Participant writes the one journal format every runtime uses (a JSON
text: version, params digest, the Submit's fields, the payload in base64; see
`Participant.journal_entry`); the browser tab keeps it in its storage, a native node in
`<state dir>/pending.json`, written here with temp file + fsync + rename + fsync of the folder,
so that a crash leaves the old file or the new one, never half of one. At start the node hands
the file's text to `Participant.restore`, which refuses an entry that is damaged (the Submit's
own check, sha256 of the payload == digest, catches a damaged payload), of another version or
of another node; the node then drops the file. The participant resubmits a restored update
(never retrains it) when its run, round and params come again, and tells the node to clear
the file when a RoundCommitted covers the round.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger("native_node.journal")
FILENAME = "pending.json"
MAX_SIZE = 1024 * 1024 * 1024  # an entry is an update (<= the frame limit) in base64


class JournalError(Exception):
    """The journal file exists but cannot be read."""


def path_of(state_dir: Path) -> Path:
    return Path(state_dir) / FILENAME


def save(state_dir: Path, entry: str) -> None:
    """Write atomically: temp file, fsync, rename, fsync of the folder."""
    path = path_of(state_dir)
    tmp = path.with_name(f".{FILENAME}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(entry.encode())
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


def load(state_dir: Path) -> str | None:
    """The journaled entry's text, None when there is none; JournalError when unreadable."""
    path = path_of(state_dir)
    try:
        if path.stat().st_size > MAX_SIZE:
            raise JournalError(f"{path} is larger than {MAX_SIZE} bytes")
        return path.read_bytes().decode()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise JournalError(f"cannot read the journal: {exc}") from exc


def clear(state_dir: Path) -> None:
    """Remove the journal; a failure is logged, never raised (the node carries on)."""
    path = path_of(state_dir)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove the pending-update journal %s: %s", path, exc)


def discard(state_dir: Path, why: str) -> None:
    """An entry the participant refused: say so and drop it (a node must never refuse to
    start over its journal)."""
    log.warning("ignoring the pending-update journal %s: %s", path_of(state_dir), why)
    clear(state_dir)
