"""Helpers shared by benchmarks: child processes on loopback, polling, output."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from transport.lifetime import orphan_safe

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def poll(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            value = cond()
            if value:
                return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextlib.contextmanager
def children(log_dir: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Yield a `spawn(name, *args)`; every child is killed on exit, and dies with this
    process if it is killed first (transport.lifetime.orphan_safe)."""
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the child
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(orphan_safe([sys.executable, *args]), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        yield spawn
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@functools.cache
def code_digest(*parts: str) -> str:
    """SHA-256 (16 hex digits) of the source a benchmark measures: every .py file under
    `parts` (packages or files, relative to the repo root), by relative path and content.

    Part of every bench cache key, so that a cached figure is never reported for code that
    has changed since it was measured (as ml/data.py's dataset cache does)."""
    h = hashlib.sha256()
    for part in parts:
        path = ROOT / part
        if not path.exists():
            raise FileNotFoundError(f"code_digest: no {part} in {ROOT}")
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def print_table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    print(" | ".join(c.rjust(widths[c]) for c in cols))
    print("-+-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(fmt(r.get(c, "")).rjust(widths[c]) for c in cols))


def emit(figures: dict[str, Any]) -> None:
    """The LAST line of every benchmark: one JSON object."""
    print(json.dumps(figures, sort_keys=True), flush=True)


def run_swarm(tmp: Path, *, nodes: int, rounds: int, server_flags: list[str],
              timeout: float = 600.0) -> dict[str, Any]:
    """Run the real server and `nodes` native nodes until `rounds` are committed.

    Returns {"run": /api/run, "rounds": /api/rounds, "wall_s": seconds, "logs": folder}."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with children(tmp) as spawn:
        server = spawn("server", "-m", "server", "--data-dir", str(tmp / "run"), "--port",
                       str(port), "--rounds", str(rounds), "--quorum", str(nodes), *server_flags)
        for i in range(nodes):
            spawn(f"node{i}", "-m", "native_node", "join", "--coordinator",
                  f"127.0.0.1:{port}", "--state-dir", str(tmp / f"node{i}"), "--threads", "1",
                  "--quiet")

        def finished() -> Any:
            if server.poll() is not None:
                tail = (tmp / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the server exited ({server.returncode}):\n{tail}")
            return (r := get_json(base + "/api/run"))["status"] == "finished" and r

        run = poll(finished, timeout, f"{rounds} rounds (logs in {tmp})")
        wall = time.monotonic() - t0
        rows = get_json(base + "/api/rounds")
    return {"run": run, "rounds": rows, "wall_s": wall, "logs": str(tmp)}
