"""A node's persistent identity.

The working core uses a random 256-bit secret kept in `<state dir>/node.key` (mode 0600);
the node id is SHA-256 of it, stable across restarts. The wire-protocol work replaces the
secret with an ML-DSA-65 key pair (node id = SHA-256 of the public key), same file rules.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path


def default_state_dir(name: str) -> Path:
    base = Path(os.environ.get("DAA_PRIME_HOME", Path.home() / ".daa-prime"))
    return base / f"node-{name}"


def load_or_create_node_id(state_dir: Path) -> str:
    """Read the node's secret (creating it 0600 on first run) and return the node id."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "node.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    secret = path.read_text().strip()
    if len(secret) != 64:
        raise ValueError(f"{path} is not a node key (expected 64 hex digits)")
    return hashlib.sha256(bytes.fromhex(secret)).hexdigest()
