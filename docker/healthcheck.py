"""The images' HEALTHCHECK (stdlib only; exit 0 healthy, 1 not).

    python docker/healthcheck.py server   the server answers GET /api/run with its run
    python docker/healthcheck.py node     the coordinator lists this node's identity as connected

The node has no port of its own, so its check asks the coordinator it joined
($DAA_COORDINATOR, HOST:PORT) whether the node id of the key in $DAA_STATE_DIR is connected.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import urllib.request
from pathlib import Path

MAGIC_LEN = 8  # transport/identity.py: MAGIC + ML-DSA-65 public key (1952) + secret key
PK_LEN = 1952


def get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=4) as resp:
        return json.loads(resp.read())


def server(port: str) -> bool:
    run = get(f"http://127.0.0.1:{port}/api/run")
    return isinstance(run, dict) and "status" in run


def node(coordinator: str, state_dir: Path) -> bool:
    blob = (state_dir / "node.key").read_bytes()
    node_id = hashlib.sha256(blob[MAGIC_LEN:MAGIC_LEN + PK_LEN]).hexdigest()
    peers = get(f"http://{coordinator}/api/peers")
    return isinstance(peers, list) and any(
        p.get("node_id") == node_id and p.get("connected") for p in peers)


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["server"]:
            ok = server(os.environ.get("DAA_PORT", "8470"))
        elif argv[:1] == ["node"]:
            ok = node(os.environ.get("DAA_COORDINATOR", "server:8470"),
                      Path(os.environ.get("DAA_STATE_DIR", "/home/daa/node")))
        else:
            print("usage: healthcheck.py server|node", file=sys.stderr)
            return 2
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print("healthy" if ok else "unhealthy")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
