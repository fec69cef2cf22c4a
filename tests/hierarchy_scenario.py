"""Run inside a private network namespace by tests/test_hierarchy_run.py: a real server with
`--transport p2p --p2p-groups 2` and N real native nodes (regions "a" and "b", half each);
prints JSON of /api/rounds, /api/rejections, the node logs and the server log once the run
is over.
`python -m tests.hierarchy_scenario DIR NODES ROUNDS FAULT`: FAULT "none", "lie" (node 0
forges every group result it computes: tests/hierarchy_faulty_node.py) or "vanish" (node 0
stops the first time it is elected aggregator and is killed -9 at once) or "silent" (the
same, but it stays connected: the other aggregator reports its update missing)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from bench.common import free_port, get_json, poll
from tests.conftest import Procs


def main() -> int:
    tmp, nodes, rounds, fault = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    quorum = nodes - 1 if fault in ("vanish", "silent") else nodes
    procs = Procs(tmp)
    port = free_port()
    try:
        procs.server("server", tmp / "run", port, "--model", "mlp-digits", "--inner-steps",
                     "5", "--quorum", str(quorum), "--rounds", str(rounds), "--transport", "p2p",
                     "--p2p-groups", "2", "--aggregator", "median", "--deadline-s", "60",
                     "--rtc-timeout-s", "20", "--p2p-timeout-s", "5")
        faulty = None
        for i in range(nodes):
            region = ["--region", "a" if i < nodes // 2 else "b"]
            if i == 0 and fault != "none":
                faulty = procs.start("n0", ["-m", "tests.hierarchy_faulty_node", fault, "join",
                                            "--coordinator", f"127.0.0.1:{port}", "--state-dir",
                                            str(tmp / "n0"), "--threads", "1", "--quiet",
                                            *region])
            else:
                procs.node(f"n{i}", port, *region)
        url = f"http://127.0.0.1:{port}"
        if fault == "vanish":
            poll(lambda: "HIER-FAULT vanished" in procs.log("n0"), 120, "node 0 to go silent")
            assert faulty is not None
            os.killpg(faulty.pid, signal.SIGKILL)
        poll(lambda: len(get_json(url + "/api/rounds")) == rounds, 180, f"{rounds} rounds")
        out = {"rounds": get_json(url + "/api/rounds"),
               "rejections": get_json(url + "/api/rejections"),
               "node_logs": [procs.log(f"n{i}") for i in range(nodes)],
               "server_log": procs.log("server")}
    finally:
        procs.kill_all()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
