"""Shared fixtures: real processes on loopback, killed at teardown whatever happens; and the
session fails when a process a test started outlives it (tests/leftovers.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import pgserver as pg
from tests import leftovers

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    leftovers.register(config)


def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll `cond` until it returns a truthy value (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:
            last = exc
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last})")


class Procs:
    """Start server / node processes with logs in tmp; kill them all at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def server(self, name: str, data_dir: Path, port: int, *flags: str) -> subprocess.Popen[bytes]:
        return self.start(name, ["-m", "server", "--data-dir", str(data_dir), "--port",
                                 str(port), *flags])

    def node(self, name: str, port: int, *flags: str) -> subprocess.Popen[bytes]:
        return self.start(name, ["-m", "native_node", "join", "--coordinator",
                                 f"127.0.0.1:{port}", "--state-dir", str(self.tmp / name),
                                 "--threads", "1", "--quiet", *flags])

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def kill_all(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.kill_all()


def in_netns(module: str, args: list[str], *, veth: bool = True, timeout: float = 240
             ) -> dict[str, Any]:
    """Run `python -m module args...` in a fresh private network namespace (bench.netns) and
    return the JSON object its last stdout line holds."""
    import json

    from bench.netns import command

    out = subprocess.run(command(module, args, veth=veth), cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="session")
def postgres() -> Iterator[pg.Server]:
    """One real PostgreSQL server for the session (bench/pgserver.py), stopped at its end; skips
    the PostgreSQL cases, saying why, where it cannot run."""
    problem = pg.find_problem()
    if problem is not None:
        pytest.skip(f"PostgreSQL cases skipped: {problem}")
    server = pg.Server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str | None:
    """The store's database for a test, once per backend: None is SQLite in the data dir;
    for PostgreSQL a fresh schema on the session's server."""
    if request.param == "sqlite":
        return None
    server: pg.Server = request.getfixturevalue("postgres")
    return server.fresh_url()
