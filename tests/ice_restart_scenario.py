"""Run inside a private network namespace by tests/test_nat.py: two native_node.mesh peers in
one process whose signaling loses the first offer. The offering side negotiates a fresh
connection at half its timeout (aiortc has no ICE restart) and the channel opens on the
second try. `python -m tests.ice_restart_scenario TIMEOUT_S`; prints JSON last."""

from __future__ import annotations

import asyncio
import json
import sys
import time

from native_node.mesh import PeerMesh
from shared.messages import SERVER

A, B = "aa" * 32, "bb" * 32  # A < B: A offers


async def main(timeout_s: float) -> dict[str, object]:
    meshes: dict[str, PeerMesh] = {}
    dropped: list[str] = []
    paths: list[tuple[str, str]] = []

    def wire(me: str) -> PeerMesh:
        async def signal(to: str, kind: str, data: str) -> None:
            if to == SERVER:
                paths.append((me, data))
            elif kind == "offer" and not dropped:
                dropped.append(kind)  # the first offer is lost on the way
            else:
                await meshes[to].on_signal(me, kind, data)

        return PeerMesh(me, signal, lambda peer, frame: None, timeout_s=timeout_s)

    meshes[A], meshes[B] = wire(A), wire(B)
    t0 = time.monotonic()
    opened = await asyncio.gather(meshes[A].connect(B), meshes[B].connect(A))
    took = time.monotonic() - t0
    await asyncio.sleep(0.2)  # the path reports
    out = {"opened": list(opened), "restarts": [meshes[A].restarts, meshes[B].restarts],
           "dropped": len(dropped), "seconds": round(took, 2),
           "pairs": [meshes[A].pairs.get(B), meshes[B].pairs.get(A)], "paths": len(paths)}
    for m in meshes.values():
        await m.close()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(float(sys.argv[1])))), flush=True)
