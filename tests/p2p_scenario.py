"""Run inside a private network namespace by tests/test_p2p_run.py: a real server with
`--transport p2p` and N real native nodes; prints JSON of /api/rounds, /api/run, /api/peers,
/api/rejections, the ledger export (/api/ledger/export) and the node logs once the run is
over.
`python -m tests.p2p_scenario DIR NODES ROUNDS FAULT [extra server flags...]`: FAULT "none",
"lie" (node 0 forges its reduced shards) or "vanish" (node 0 stops mid-transfer in its
first reduction and is then killed -9)."""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.request
from pathlib import Path

from bench.common import free_port, get_json, poll
from tests.conftest import Procs


def main() -> int:
    tmp, nodes, rounds, fault = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    quorum = nodes - 1 if fault == "vanish" else nodes
    procs = Procs(tmp)
    port = free_port()
    try:
        procs.server("server", tmp / "run", port, "--model", "mlp-digits", "--inner-steps",
                     "5", "--quorum", str(quorum), "--rounds", str(rounds), "--transport", "p2p",
                     "--aggregator", "median", "--deadline-s", "60", "--rtc-timeout-s", "20",
                     "--p2p-timeout-s", "5", *sys.argv[5:])
        faulty = None
        for i in range(nodes):
            if i == 0 and fault != "none":
                faulty = procs.start("n0", ["-m", "tests.p2p_faulty_node", fault, "join",
                                   "--coordinator", f"127.0.0.1:{port}", "--state-dir",
                                   str(tmp / "n0"), "--threads", "1", "--quiet"])
            else:
                procs.node(f"n{i}", port)
        url = f"http://127.0.0.1:{port}"
        if fault == "vanish":
            poll(lambda: "P2P-FAULT vanished" in procs.log("n0"), 120, "node 0 to stop")
            assert faulty is not None
            os.killpg(faulty.pid, signal.SIGKILL)
        poll(lambda: len(get_json(url + "/api/rounds")) == rounds, 180, f"{rounds} rounds")
        out = {"rounds": get_json(url + "/api/rounds"), "run": get_json(url + "/api/run"),
               "peers": get_json(url + "/api/peers"),
               "rejections": get_json(url + "/api/rejections"),
               "ledger_export": urllib.request.urlopen(url + "/api/ledger/export",
                                                       timeout=30).read().decode(),
               "node_logs": [procs.log(f"n{i}") for i in range(nodes)],
               "server_log": procs.log("server")}
    finally:
        procs.kill_all()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
