"""A native node that misbehaves as a group aggregator, for tests/test_hierarchy_run.py: the
real node with one fault added (the Byzantine behaviour lives here, in test code).

    python -m tests.hierarchy_faulty_node MODE join --coordinator HOST:PORT ...

MODE "lie": every group result this node computes is forged (its first value set to 1000, a
valid payload of the round's result codec).
MODE "vanish" (and "silent"): the first time it is elected aggregator the node logs
"HIER-FAULT vanished" and stops handling anything of the reduction, for good (with "vanish"
the test then kills it -9; a "silent" node stays connected and keeps training)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import numpy as np

from native_node.__main__ import main
from native_node.group import GroupRole
from shared.hierarchy import GroupReducer, parse_plan
from shared.messages import ShardPlan, sha256_hex
from shared.p2p import decode_result, encode_result


def lie() -> None:
    real = GroupReducer._reduce_ready

    def forged(self: GroupReducer) -> list[dict[str, Any]]:
        out = real(self)
        for e in out:
            if e["kind"] == "result":
                vec = np.array(decode_result(e["payload"], self.plan.n_params,
                                             self.result_codec))
                vec[0] = 1000.0
                e["payload"] = self.result = encode_result(vec, self.result_codec)
                e["digest"] = sha256_hex(e["payload"])
                print("HIER-FAULT forged a group result", file=sys.stderr, flush=True)
        return out

    GroupReducer._reduce_ready = forged  # type: ignore[method-assign]


def vanish() -> None:
    real = GroupRole.on_plan

    async def on_plan(self: GroupRole, msg: ShardPlan) -> None:
        plan, _, _ = parse_plan(msg.plan)
        if self.host.me in plan.owners[0]:
            print("HIER-FAULT vanished as an aggregator", file=sys.stderr, flush=True)
            await asyncio.Event().wait()  # never again
        await real(self, msg)

    GroupRole.on_plan = on_plan  # type: ignore[method-assign]


if __name__ == "__main__":
    {"lie": lie, "vanish": vanish, "silent": vanish}[sys.argv[1]]()
    sys.exit(main(sys.argv[2:]))
