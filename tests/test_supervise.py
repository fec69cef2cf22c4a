"""The node supervisor (native_node/supervise.py): crashed workers are forked again at once.

Unit cases run the supervisor in a child Python process (so the test process itself never
forks); the real case kills -9 a supervised node's worker while a real server runs and checks
that a new worker, on the same identity, gets updates accepted again and the run finishes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import free_port, get_json
from native_node.supervise import backoff_s, describe
from tests.conftest import ROOT, Procs, wait_for


def test_backoff_grows_only_on_consecutive_quick_crashes() -> None:
    assert [backoff_s(k) for k in range(0, 5)] == [0.0, 0.0, 0.5, 1.0, 2.0]
    assert backoff_s(40) == 30.0


def test_describe_says_how_a_worker_ended() -> None:
    assert describe(signal.SIGKILL) == "signal 9 (SIGKILL)"  # waitpid status of a kill -9
    assert describe(3 << 8) == "exit 3"


SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from native_node.supervise import supervise
marker = Path(sys.argv[1]); mode = sys.argv[2]
def worker():
    runs = int(marker.read_text()) + 1 if marker.exists() else 1
    marker.write_text(str(runs))
    if mode == "crash-once" and runs == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "crash-always":
        os.kill(os.getpid(), signal.SIGSEGV)
    if mode == "usage":
        return 2
    if mode == "wait":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
        print("ready", flush=True)
        time.sleep(60)
    return 0
sys.exit(supervise(worker, max_restarts=int(sys.argv[3]) if len(sys.argv) > 3 else None))
"""


def _run(tmp_path: Path, mode: str, *extra: str) -> tuple[int, int, str]:
    marker = tmp_path / "runs"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(marker), mode, *extra], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    return out.returncode, int(marker.read_text()), out.stderr


def test_a_killed_worker_is_restarted_and_a_finished_one_is_not(tmp_path: Path) -> None:
    code, runs, _ = _run(tmp_path, "crash-once")
    assert (code, runs) == (0, 2)
    (tmp_path / "runs").unlink()
    assert _run(tmp_path, "usage")[:2] == (2, 1)  # bad arguments: restarting cannot help


def test_a_crash_loop_backs_off_and_gives_up_at_max_restarts(tmp_path: Path) -> None:
    code, runs, err = _run(tmp_path, "crash-always", "3")
    assert runs == 4
    assert code == 1
    # the first quick crash is restarted at once, quick crashes 2 and 3 back off
    assert [line.rsplit(";", 1)[1] for line in err.splitlines() if "; restart " in line] == [
        " restart 1 now", " restart 2 in 0.5 s", " restart 3 in 1.0 s"]
    assert "3 restarts used, giving up" in err


def test_sigterm_reaches_the_worker_and_is_not_a_crash(tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(marker), "wait"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 7  # the worker's own status, and no second worker
    assert marker.read_text() == "1"


def _worker_pid(supervisor: int) -> int | None:
    try:
        kids = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_supervised_node_worker_killed_rejoins_with_same_identity(
        procs: Procs, tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "run"
    base = f"http://127.0.0.1:{port}"
    # 1,000 inner steps keep a round ~0.5 s long: with 20, a round took ~15 ms once signing
    # got fast, and the run ended before the test could find (and kill) a worker
    procs.server("server", data, port, "--model", "mlp-digits", "--inner-steps", "1000",
                 "--batch-size", "32", "--quorum", "2", "--deadline-s", "30", "--rounds", "6")
    sup = procs.node("sup", port, "--supervise")
    procs.node("plain", port)

    def rounds_with_update(node_id: str) -> set[int]:
        with contextlib.closing(sqlite3.connect(data / "run.sqlite")) as db:
            return {r for (r,) in db.execute(
                "SELECT round FROM updates WHERE node_id = ?", (node_id,))}

    wait_for(lambda: get_json(base + "/api/run")["committed_rounds"] >= 2, 90, "2 rounds")
    node_id = procs.log("sup").split("node id ", 1)[1].split()[0]
    first = wait_for(lambda: _worker_pid(sup.pid), 10, "the supervised worker")
    assert rounds_with_update(node_id)
    open_round = int(get_json(base + "/api/run")["round"])
    os.kill(first, signal.SIGKILL)
    # the supervisor's log names each worker it starts (a short-lived one may be gone
    # before /proc is polled)
    second = wait_for(lambda: [int(p) for p in re.findall(r"worker (\d+) started",
                                                          procs.log("sup"))][1:2], 30,
                      "a new worker")[0]
    wait_for(lambda: max(rounds_with_update(node_id)) > open_round, 90,
             f"an update from the new worker (logs in {tmp_path})")
    wait_for(lambda: get_json(base + "/api/run")["status"] == "finished", 90, "the run's end")
    assert sup.wait(30) == 0  # the worker finished the run: the supervisor exits 0, no restart
    log = procs.log("sup")
    assert f"worker {first} died (signal 9 (SIGKILL)); restart 1 now" in log
    assert log.count("node id ") == 2
    assert log.count(node_id) >= 2  # the same identity again
    assert second != first
