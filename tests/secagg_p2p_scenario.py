"""Run inside a private network namespace by tests/test_secagg_p2p.py: a real server with
`--transport p2p --secagg` and N real native nodes (DAA_SECAGG_KEEP_PLAIN: each keeps its
fixed-point words in its state dir); one round; prints JSON of /api/rounds, /api/run and the
logs.

`python -m tests.secagg_p2p_scenario DIR NODES FAULT [ROUNDS]`: FAULT "none", "drop" (node 0
sends every masked slice of its reduction of round 1, logs "SECAGG-P2P dropped after its
slices", stops, and is killed -9) or "badslice" (from round 1 node 0's masked slices carry one
u32 word too many). ROUNDS: 1 without a fault, else 2 (round 0 may be keyed before every node
is in; round 1 always has all of them, so the fault hits a round node 0 masks in).
The server is stopped (SIGSTOP) until every node's connection waits in its accept queue, so
that all of them are in the round's key stages whatever the machine's load.
`python -m tests.secagg_p2p_scenario node FAULT join ...`: node 0 of that fault (the fault added
here, in test code).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import free_port, get_json, poll
from tests.conftest import Procs


def established(port: int) -> int:
    """TCP connections to `port` (local side) that are established, accepted or not."""
    n = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "01":
                n += 1
    return n


def main() -> int:
    tmp, nodes, fault = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 1 if fault == "none" else 2
    os.environ["DAA_SECAGG_KEEP_PLAIN"] = "1"
    procs = Procs(tmp)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        server = procs.server(
            "server", tmp / "run", port, "--model", "mlp-digits", "--inner-steps", "5",
            "--quorum", str(nodes - 1 if fault != "none" else nodes), "--rounds", str(rounds),
            "--transport", "p2p", "--secagg", "--secagg-clip", "0.5", "--secagg-timeout-s",
            "30", "--aggregator", "mean", "--deadline-s", "90", "--rtc-timeout-s", "20",
            "--p2p-timeout-s", "5")
        poll(lambda: get_json(url + "/api/run") is not None, 60, "the server")
        os.kill(server.pid, signal.SIGSTOP)
        try:
            for i in range(nodes):
                if i == 0 and fault != "none":
                    victim = procs.start("n0", ["-m", "tests.secagg_p2p_scenario", "node",
                                                fault, "join", "--coordinator", f"127.0.0.1:{port}",
                                                "--state-dir", str(tmp / "n0"), "--threads",
                                                "1", "--quiet"])
                else:
                    procs.node(f"n{i}", port)
            poll(lambda: established(port) >= nodes, 120, "every node's connection")
            time.sleep(0.5)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        if fault == "drop":
            poll(lambda: "SECAGG-P2P dropped" in procs.log("n0"), 150, "node 0 to drop")
            os.killpg(victim.pid, signal.SIGKILL)
        poll(lambda: len(get_json(url + "/api/rounds")) == rounds, 180, "the rounds")
        out = {"rounds": get_json(url + "/api/rounds"), "run": get_json(url + "/api/run"),
               "node_logs": [procs.log(f"n{i}") for i in range(nodes)],
               "server_log": procs.log("server")}
    finally:
        procs.kill_all()
    print(json.dumps(out))
    return 0


def drop_after_slices() -> None:
    """Node 0 of "drop": route its first reduction's events (every masked slice), then stop."""
    import native_node.p2p as node_p2p

    real = node_p2p.P2PRole._route

    async def route(self: node_p2p.P2PRole, events: list[dict[str, Any]]) -> None:
        await real(self, events)
        r = self.reducer
        if r is not None and r.plan.round >= 1 and any(e["kind"] == "part" for e in events):
            await asyncio.sleep(1.0)  # the channels flush
            print("SECAGG-P2P dropped after its slices", file=sys.stderr, flush=True)
            await asyncio.Event().wait()  # never again (the scenario kills it -9)

    node_p2p.P2PRole._route = route  # type: ignore[method-assign]


def bad_slices() -> None:
    """Node 0 of "badslice": every masked slice it sends has one u32 word too many."""
    from shared.secagg.p2p import SecAggShardReducer

    real = SecAggShardReducer._slice

    def longer(self: SecAggShardReducer, shard: int) -> bytes:
        return real(self, shard) + (b"\0\0\0\0" if self.plan.round >= 1 else b"")

    SecAggShardReducer._slice = longer  # type: ignore[method-assign,assignment]


if __name__ == "__main__":
    if sys.argv[1] == "node":
        from native_node.__main__ import main as node_main

        {"drop": drop_after_slices, "badslice": bad_slices}[sys.argv[2]]()
        sys.exit(node_main(sys.argv[3:]))
    raise SystemExit(main())
