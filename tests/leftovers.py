"""Fail the test session when a process it started outlives it.

Registered by tests/conftest.py and e2e/conftest.py (once per session, whichever loads first).
At configure time the session exports DAA_TEST_SESSION=<pytest pid>; every process a test
starts inherits it (it is in /proc/PID/environ even after the process is reparented to init,
which is what happens to a `start_new_session` child whose parent died). After each test the
descendants of pytest are recorded too, for children started with an environment of their own.

At session end, after the session fixtures are torn down: pytest's own multiprocessing helpers
(resource tracker, forkserver) are stopped; every process still alive that is a descendant of
pytest, carries the marker or was recorded gets a grace of GRACE_S to exit; the survivors are
listed, SIGKILLed, and the session fails (exit status 1). /proc only (Linux); elsewhere the
check does nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ENV = "DAA_TEST_SESSION"
NAME = "daa-leftover-processes"
GRACE_S = 5.0
PROC = Path("/proc")


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    state: str  # one letter, as in /proc/PID/stat ("Z": a zombie, already dead)
    start: int  # start time in clock ticks since boot: (pid, start) names one process
    cmd: str


def read(pid: int) -> ProcInfo | None:
    """The process `pid`, or None when it is gone (or not readable)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
        cmd = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
    text = cmd.replace(b"\0", b" ").decode(errors="replace").strip()
    return ProcInfo(pid=pid, ppid=int(fields[1]), state=fields[0], start=int(fields[19]),
                    cmd=text or stat[stat.index("(") + 1:stat.rindex(")")])


def table() -> dict[int, ProcInfo]:
    """Every process visible in /proc, by pid."""
    out: dict[int, ProcInfo] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(PROC):
            if entry.name.isdigit() and (info := read(int(entry.name))) is not None:
                out[info.pid] = info
    return out


def descendants(root: int, procs: dict[int, ProcInfo]) -> list[ProcInfo]:
    """The live (non-zombie) descendants of `root` in `procs`."""
    kids: dict[int, list[ProcInfo]] = {}
    for p in procs.values():
        kids.setdefault(p.ppid, []).append(p)
    out, todo = [], [root]
    while todo:
        for child in kids.get(todo.pop(), []):
            todo.append(child.pid)
            if child.state != "Z":
                out.append(child)
    return out


def alive(p: ProcInfo) -> bool:
    """True while the very process `p` (not a later one with its pid) is running."""
    now = read(p.pid)
    return now is not None and now.start == p.start and now.state != "Z"


def marked(pid: int, token: str) -> bool:
    try:
        env = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return False
    return f"{ENV}={token}".encode() in env.split(b"\0")


def _stop_multiprocessing_helpers() -> None:
    """pytest's own resource tracker and forkserver (started by in-process benches) exit
    when pytest does; stop them now so that they are not reported."""
    from multiprocessing import forkserver, resource_tracker

    for helper in (resource_tracker._resource_tracker, forkserver._forkserver):
        stop = getattr(helper, "_stop", None)  # private, so not in typeshed
        if callable(stop):
            with contextlib.suppress(Exception):
                stop()


class LeftoverCheck:
    def __init__(self) -> None:
        self.root = os.getpid()
        self.token = str(self.root)
        os.environ[ENV] = self.token
        self.seen: dict[tuple[int, int], ProcInfo] = {}

    def strays(self) -> list[ProcInfo]:
        procs = table()
        found = {(p.pid, p.start): p for p in descendants(self.root, procs)}
        for p in procs.values():
            if p.pid != self.root and p.state != "Z" and marked(p.pid, self.token):
                found[(p.pid, p.start)] = p
        for key, p in self.seen.items():
            if key not in found and alive(p):
                found[key] = p
        return sorted(found.values(), key=lambda p: p.pid)

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logfinish(self) -> None:
        if PROC.is_dir():
            for p in descendants(self.root, table()):
                self.seen[(p.pid, p.start)] = p

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not PROC.is_dir():
            return
        _stop_multiprocessing_helpers()
        deadline = time.monotonic() + GRACE_S
        while (left := self.strays()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not left:
            return
        lines = [f"pid {p.pid} (parent {p.ppid}): {p.cmd[:160]}" for p in left]
        for p in left:
            if alive(p):
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGKILL)
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        title = (f"{len(left)} process(es) started by this session outlived it "
                 f"{GRACE_S:.0f} s after the last test (now killed)")
        if tr is not None:
            tr.write_sep("=", title, red=True)
            for line in lines:
                tr.write_line(line)
        else:
            print(title, *lines, sep="\n")
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def register(config: pytest.Config) -> None:
    """Install the check once per session (both conftests call this)."""
    if config.pluginmanager.get_plugin(NAME) is None:
        config.pluginmanager.register(LeftoverCheck(), NAME)
