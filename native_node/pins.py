"""The native node's server pins (run id -> server id), kept in `<state_dir>/servers.json`
(written atomically). shared.trust.ServerTrust, inside the participant, decides; this file
only stores what it decided."""

from __future__ import annotations

import json
import os
from pathlib import Path

FILENAME = "servers.json"


def load(state_dir: Path) -> dict[str, str]:
    """The pins; an unreadable file counts as none (the next Challenge pins again)."""
    path = Path(state_dir) / FILENAME
    if not path.exists():
        return {}
    try:
        loaded = json.loads(path.read_text())
        return {str(k): str(v) for k, v in loaded.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def save(state_dir: Path, pins: dict[str, str]) -> None:
    path = Path(state_dir) / FILENAME
    tmp = path.with_name(f".{FILENAME}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(pins, indent=1, sort_keys=True))
    os.replace(tmp, path)
