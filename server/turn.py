"""The run's ICE servers for each node, with short-lived TURN credentials minted per node.

The TURN REST API scheme (draft-uberti-behave-turn-rest-00), which coturn checks with
`--use-auth-secret --static-auth-secret=SECRET`: username = "EXPIRY:NODE" (EXPIRY in Unix
seconds), password = base64(HMAC-SHA1(SECRET, username)). The TURN server needs only the
shared secret; it refuses a username whose EXPIRY has passed (401) and a password not made
with the secret. Every `Welcome` carries freshly minted credentials, valid `ttl_s` from then.

    >>> m = IceServers(("stun:10.0.0.1:3478", "turn:10.0.0.1:3478"), secret=b"s", ttl_s=60)
    >>> [e["urls"] for e in m.for_node("ab" * 32, now=1000.0)]
    ['stun:10.0.0.1:3478', 'turn:10.0.0.1:3478']
    >>> m.for_node("ab" * 32, now=1000.0)[1]["username"][:5]
    '1060:'
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TTL_S = 6 * 3600.0  # how long a minted TURN credential is valid


def credential(secret: bytes, username: str) -> str:
    """The TURN REST API password of `username`: base64(HMAC-SHA1(secret, username))."""
    return base64.b64encode(hmac.new(secret, username.encode(), hashlib.sha1).digest()).decode()


def mint(secret: bytes, node_id: str, *, ttl_s: float, now: float | None = None
         ) -> tuple[str, str]:
    """(username, password) for `node_id`, valid until now + ttl_s."""
    expiry = int((time.time() if now is None else now) + ttl_s)
    username = f"{expiry}:{node_id}"
    return username, credential(secret, username)


def expiry_of(username: str) -> int | None:
    """The expiry (Unix seconds) a REST API username carries, or None."""
    head = username.split(":", 1)[0]
    return int(head) if head.isdigit() else None


def read_secret(path: str) -> bytes:
    """The shared secret from a file (first line, stripped): kept off the command line."""
    try:
        text = Path(path).read_text().strip().splitlines()
    except OSError as exc:
        raise ValueError(f"--turn-secret-file {path}: {exc.strerror or exc}") from None
    if not text or not text[0].strip():
        raise ValueError(f"--turn-secret-file {path} is empty")
    return text[0].strip().encode()


@dataclass(frozen=True, kw_only=True)
class IceServers:
    """The run's STUN/TURN URLs (`ice_servers`) and, for TURN, the shared secret."""

    urls: tuple[str, ...]
    secret: bytes | None = None
    ttl_s: float = DEFAULT_TTL_S

    def check(self) -> None:
        """Refuse a configuration nodes could not use (python -m server, at start)."""
        if self.has_turn and self.secret is None:
            raise ValueError("ice_servers lists a TURN server but no --turn-secret-file was "
                             "given: the server mints each node's TURN credential from the "
                             "secret the TURN server was started with (docs/operator.md, "
                             "Deployment)")
        if self.ttl_s <= 0:
            raise ValueError("--turn-ttl-s must be > 0")

    @classmethod
    def parse(cls, text: str, *, secret: bytes | None = None,
              ttl_s: float = DEFAULT_TTL_S) -> IceServers:
        return cls(urls=tuple(u.strip() for u in text.split(",") if u.strip()), secret=secret,
                   ttl_s=ttl_s)

    @property
    def has_turn(self) -> bool:
        return any(u.startswith("turn") for u in self.urls)

    def for_node(self, node_id: str, *, now: float | None = None) -> list[dict[str, Any]]:
        """Welcome.ice_servers for `node_id`: STUN as is, TURN with a fresh credential."""
        out: list[dict[str, Any]] = []
        for url in self.urls:
            if url.startswith("turn") and self.secret is not None:
                user, password = mint(self.secret, node_id, ttl_s=self.ttl_s, now=now)
                out.append({"urls": url, "username": user, "credential": password})
            else:
                out.append({"urls": url, "username": "", "credential": ""})
        return out
