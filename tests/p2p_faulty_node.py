"""A native node that misbehaves in the p2p reduction, for tests/test_p2p_run.py: a real
process running the real node with one fault added (the Byzantine behaviour lives here, in
test code, like the attacks of bench.simulate).

    python -m tests.p2p_faulty_node MODE join --coordinator HOST:PORT ...

MODE "lie": every shard this node reduces is forged (its first value set to 1000, a valid
payload of the round's result codec).
MODE "vanish": in its first reduction the node sends half of its slices, logs
"P2P-FAULT vanished mid-transfer" and stops sending anything (the test then kills it -9)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import numpy as np

import native_node.p2p as node_p2p
from native_node.__main__ import main
from shared.p2p import ShardReducer, decode_result, encode_result


def lie() -> None:
    real = ShardReducer._reduce_ready

    def forged(self: ShardReducer) -> list[dict[str, Any]]:
        out = real(self)
        for e in out:
            if e["kind"] == "result":
                lo, hi = self.plan.bounds(e["shard"])
                vec = np.array(decode_result(e["payload"], hi - lo, self.result_codec))
                vec[0] = 1000.0
                e["payload"] = encode_result(vec, self.result_codec)
        return out

    ShardReducer._reduce_ready = forged  # type: ignore[method-assign]


def vanish() -> None:
    real = node_p2p.P2PRole._route

    async def route(self: node_p2p.P2PRole, events: list[dict[str, Any]]) -> None:
        parts = [e for e in events if e["kind"] == "part"]
        if len(parts) >= 2:
            await real(self, [e for e in events if e["kind"] != "part"] + parts[:len(parts) // 2])
            print("P2P-FAULT vanished mid-transfer", file=sys.stderr, flush=True)
            await asyncio.Event().wait()  # never again
        await real(self, events)

    node_p2p.P2PRole._route = route  # type: ignore[method-assign]


if __name__ == "__main__":
    {"lie": lie, "vanish": vanish}[sys.argv[1]]()
    sys.exit(main(sys.argv[2:]))
