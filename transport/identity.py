"""A node's persistent ML-DSA-65 identity.

`<state dir>/node.key` (mode 0600; refused when others can read it) holds the key pair:
the 8-byte magic b"DAAPKEY1", the 1952-byte public key, then the 4032-byte secret key. The
node id is SHA-256 of the public key (shared.envelope.node_id_of).
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.envelope import Identity
from shared.platform import PqcryptoMLDSA65

MAGIC = b"DAAPKEY1"
PK_LEN, SK_LEN = PqcryptoMLDSA65.PUBLIC_KEY_LEN, PqcryptoMLDSA65.SECRET_KEY_LEN


def default_state_dir(name: str) -> Path:
    base = Path(os.environ.get("DAA_PRIME_HOME", Path.home() / ".daa-prime"))
    return base / f"node-{name}"


def load_or_create_identity(state_dir: Path, filename: str = "node.key") -> Identity:
    """Read a key pair (a node's, or the server's `server.key`), creating it (mode 0600)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / filename
    if not path.exists():
        ident = Identity.generate()
        tmp = path.with_name(f".{filename}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(MAGIC + ident.public_key + ident.secret_key)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    blob = path.read_bytes()
    if len(blob) != len(MAGIC) + PK_LEN + SK_LEN or not blob.startswith(MAGIC):
        raise ValueError(f"{path} is not a DAA Prime ML-DSA-65 node key "
                         f"(expected {len(MAGIC) + PK_LEN + SK_LEN} bytes starting {MAGIC!r}); "
                         "move it away to create a new identity")
    pk = blob[len(MAGIC):len(MAGIC) + PK_LEN]
    return Identity(public_key=pk, secret_key=blob[len(MAGIC) + PK_LEN:])
