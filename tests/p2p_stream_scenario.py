"""Run inside a private network namespace by tests/test_p2p_stream_run.py: a real server with
`--transport p2p --stream-chunk-mb CHUNK` and N real native nodes (node 0 with a channel cut
when FAULT is "cut": tests/p2p_stream_node.py); prints JSON of /api/rounds, /api/run,
/api/peers, /api/rejections and the node and server logs once ROUNDS rounds are committed.
`python -m tests.p2p_stream_scenario DIR NODES ROUNDS CHUNK_MB FAULT [extra server flags...]`"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import free_port, get_json, poll
from tests.conftest import Procs


def main() -> int:
    tmp, nodes, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    chunk_mb, fault = sys.argv[4], sys.argv[5]
    procs = Procs(tmp)
    port = free_port()
    try:
        procs.server("server", tmp / "run", port, "--model", "mlp-digits", "--inner-steps",
                     "5", "--quorum", str(nodes), "--rounds", str(rounds), "--transport", "p2p",
                     "--aggregator", "median", "--deadline-s", "60", "--rtc-timeout-s", "20",
                     "--p2p-timeout-s", "20", "--stream-chunk-mb", chunk_mb, *sys.argv[6:])
        for i in range(nodes):
            if i == 0 and fault == "cut":
                procs.start("n0", ["-m", "tests.p2p_stream_node", "join", "--coordinator",
                                   f"127.0.0.1:{port}", "--state-dir", str(tmp / "n0"),
                                   "--threads", "1", "--quiet"])
            else:
                procs.node(f"n{i}", port)
        url = f"http://127.0.0.1:{port}"
        poll(lambda: len(get_json(url + "/api/rounds")) == rounds, 180, f"{rounds} rounds")
        out = {"rounds": get_json(url + "/api/rounds"), "run": get_json(url + "/api/run"),
               "peers": get_json(url + "/api/peers"),
               "rejections": get_json(url + "/api/rejections"),
               "node_logs": [procs.log(f"n{i}") for i in range(nodes)],
               "server_log": procs.log("server")}
    finally:
        procs.kill_all()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
