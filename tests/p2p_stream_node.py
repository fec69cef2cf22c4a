"""A native node whose data channel to one peer drops mid-exchange, for
tests/test_p2p_stream_run.py: the real node with one fault added (test code).

    python -m tests.p2p_stream_node join --coordinator HOST:PORT ...

In round 0, just before its CUT_AT-th piece to some peer goes, the node closes its connection
to that peer (RTCPeerConnection.close: the channel drops on both ends with pieces in flight)
and logs "P2P-STREAM cut channel to <id>"; both nodes then go on through the server's relay,
each resending from its first piece the other has not acknowledged."""

from __future__ import annotations

import sys

import native_node.p2p_send as p2p_send
from native_node.__main__ import main

CUT_AT = 3


def cut() -> None:
    real = p2p_send.PieceSender._send
    count: dict[str, int] = {}
    done = {"cut": False}

    async def send(self: p2p_send.PieceSender, to: str, shard: int) -> p2p_send.Path:
        r = self.role.reducer
        if r is not None and r.plan.round == 0 and not done["cut"] and to in self.role.mesh.links:
            count[to] = count.get(to, 0) + 1
            if count[to] == CUT_AT:
                done["cut"] = True
                print(f"P2P-STREAM cut channel to {to}", file=sys.stderr, flush=True)
                pc = self.role.mesh.pcs.get(to)
                if pc is not None:
                    await pc.close()
        return await real(self, to, shard)

    p2p_send.PieceSender._send = send  # type: ignore[method-assign]


if __name__ == "__main__":
    cut()
    sys.exit(main(sys.argv[1:]))
