"""A node's persistent ML-DSA-65 identity.

`<state dir>/node.key` (mode 0600; refused when others can read it) holds the key pair:
the 8-byte magic b"DAAPKEY2", the 1952-byte public key, then the 32-byte seed the key pair is
derived from (FIPS 204's ξ; signed through `cryptography`, shared.platform.NativeMLDSA65).
Files written before hold b"DAAPKEY1", the public key and the 4032-byte expanded secret key;
they still load and sign (through pqcrypto). The node id is SHA-256 of the public key
(shared.envelope.node_id_of).
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.envelope import Identity
from shared.platform import NativeMLDSA65, PqcryptoMLDSA65

MAGIC, MAGIC_SEED = b"DAAPKEY1", b"DAAPKEY2"
PK_LEN, SK_LEN = PqcryptoMLDSA65.PUBLIC_KEY_LEN, PqcryptoMLDSA65.SECRET_KEY_LEN
SEED_LEN = NativeMLDSA65.SEED_LEN
LAYOUTS = {MAGIC: SK_LEN, MAGIC_SEED: SEED_LEN}  # magic -> length of the secret part


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
            magic = MAGIC_SEED if len(ident.secret_key) == SEED_LEN else MAGIC
            fh.write(magic + ident.public_key + ident.secret_key)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
    blob = path.read_bytes()
    sk_len = LAYOUTS.get(blob[:len(MAGIC)])
    if sk_len is None or len(blob) != len(MAGIC) + PK_LEN + sk_len:
        raise ValueError(f"{path} is not a DAA Prime ML-DSA-65 node key (expected "
                         f"{len(MAGIC) + PK_LEN + SEED_LEN} bytes starting {MAGIC_SEED!r}, or "
                         f"{len(MAGIC) + PK_LEN + SK_LEN} starting {MAGIC!r}); "
                         "move it away to create a new identity")
    pk, sk = blob[len(MAGIC):len(MAGIC) + PK_LEN], blob[len(MAGIC) + PK_LEN:]
    if sk_len == SEED_LEN and NativeMLDSA65().public_key_of(sk) != pk:
        raise ValueError(f"{path}: the public key is not the one its seed derives (a damaged "
                         "file); move it away to create a new identity")
    return Identity(public_key=pk, secret_key=sk)
