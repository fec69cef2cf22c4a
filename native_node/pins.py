"""The native node's server pins (run id -> server id), kept in `<state_dir>/servers.json`
(written atomically). shared.trust.ServerTrust, inside the participant, decides; this file
only stores what it decided. `<state_dir>/tls.json` keeps the addresses and server ids that
spoke TLS to this node: native_node.client refuses plain ws:// to them afterwards."""

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


TLS_FILENAME = "tls.json"


def tls_seen(state_dir: Path) -> dict[str, list[str]]:
    """Where this node has talked TLS before: {"addresses": [host:port ...], "servers":
    [server id ...]}. A node refuses a plain ws:// connection to any of them (a downgrade)."""
    path = Path(state_dir) / TLS_FILENAME
    empty: dict[str, list[str]] = {"addresses": [], "servers": []}
    if not path.exists():
        return empty
    try:
        loaded = json.loads(path.read_text())
        return {k: sorted({str(v) for v in loaded.get(k, [])}) for k in empty}
    except (OSError, ValueError, AttributeError, TypeError):
        return empty


def record_tls(state_dir: Path, *, address: str, server_id: str | None) -> None:
    """Remember that `address` (and the server key `server_id`) spoke TLS to this node."""
    seen = tls_seen(state_dir)
    added = {"addresses": address, "servers": server_id}
    if all(v is None or v in seen[k] for k, v in added.items()):
        return
    for k, v in added.items():
        if v is not None and v not in seen[k]:
            seen[k] = sorted([*seen[k], v])
    path = Path(state_dir) / TLS_FILENAME
    tmp = path.with_name(f".{TLS_FILENAME}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(seen, indent=1, sort_keys=True))
    os.replace(tmp, path)
