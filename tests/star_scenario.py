"""Run inside a private network namespace by tests/test_star.py: a real server with
`--transport star` and two real native nodes; prints JSON of what /api/peers and /api/rounds
show once the run is over. `python -m tests.star_scenario DIR RTC_TIMEOUT_S INNER_STEPS`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import free_port, get_json, poll
from tests.conftest import Procs


def main() -> int:
    tmp, timeout, steps = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    procs = Procs(tmp)
    port = free_port()
    try:
        procs.server("server", tmp / "run", port, "--model", "mlp-digits", "--inner-steps",
                     steps, "--quorum", "2", "--rounds", "3", "--transport", "star",
                     "--rtc-timeout-s", timeout, "--deadline-s", "60")
        for i in range(2):
            procs.node(f"n{i}", port)
        url = f"http://127.0.0.1:{port}"
        poll(lambda: len(get_json(url + "/api/rounds")) == 3, 120, "3 rounds")
        out = {"rounds": get_json(url + "/api/rounds"), "peers": get_json(url + "/api/peers"),
               "run": get_json(url + "/api/run"),
               "node_logs": [procs.log(f"n{i}") for i in range(2)]}
    finally:
        procs.kill_all()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
