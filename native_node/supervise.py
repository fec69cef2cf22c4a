"""Restart a crashed node in well under a second: a supervisor that forks pre-imported workers.

`python -m native_node join --supervise ...` runs this. The supervisor process imports the
node's modules (torch among them: the bulk of a cold start, 1.2 s idle and 3-5 s on a loaded
machine) once, then forks a worker that does everything else: it picks the device, loads the
identity, connects and trains. When the worker dies from a crash (a signal such as SIGKILL or
SIGSEGV, or an unexpected exit status) the supervisor forks a fresh one at once, from the
already-imported state, on the same identity and state dir; the new worker resubmits a
journaled update or syncs the latest params like any restarted node (docs/fault-tolerance.md).

The rules:
- exit 0 (run over, --max-rounds reached) and exit 2 (bad arguments or identity): no restart;
- SIGINT / SIGTERM to the supervisor are passed to the worker, which shuts down cleanly; then
  the supervisor exits with the worker's status;
- a worker that dies within `quick_s` of its start counts as a quick crash; consecutive quick
  crashes back off 0.5, 1, 2, ... up to 30 s, so a node that cannot start does not spin;
- the worker gets SIGKILL if the supervisor itself dies (Linux PR_SET_PDEATHSIG, through
  transport.lifetime.die_with_parent), so no orphan keeps training under a dead supervisor.

Fork safety: the supervisor imports only; it starts no thread, opens no socket, runs no torch
op and never touches CUDA (pick_device runs in the worker), so each worker starts as a
single-threaded copy of an import-only process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

from transport.lifetime import die_with_parent

log = logging.getLogger("native_node.supervise")

NO_RESTART = (0, 2)  # finished, usage error
FORWARDED = (signal.SIGINT, signal.SIGTERM)


def describe(status: int) -> str:
    """'signal 9 (SIGKILL)' or 'exit 3' for a waitpid status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "?"
        return f"signal {sig} ({name})"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def backoff_s(quick_crashes: int, *, cap_s: float = 30.0) -> float:
    """Delay before the next fork after `quick_crashes` consecutive quick crashes."""
    if quick_crashes <= 1:
        return 0.0
    return min(cap_s, 0.5 * 2.0 ** (quick_crashes - 2))


def supervise(worker: Callable[[], int], *, quick_s: float = 10.0,
              max_restarts: int | None = None) -> int:
    """Run `worker()` in forked children until it finishes; returns its exit code."""
    stopping: list[int] = []
    child = 0

    def forward(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    old = {s: signal.signal(s, forward) for s in FORWARDED}
    restarts = quick = 0
    try:
        while True:
            started = time.monotonic()
            me = os.getpid()
            # SIGINT/SIGTERM stay blocked across the fork until `child` holds the worker's pid:
            # CPython may run `forward` right after fork() returns and before the assignment,
            # and a signal forwarded to pid 0 would leave the worker running and us waiting.
            signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
            child = os.fork()
            if child == 0:  # the worker
                for s, h in old.items():
                    signal.signal(s, h)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
                die_with_parent(me)
                code = 1
                try:
                    code = worker()
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    logging.getLogger("native_node").exception("worker crashed")
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # a pending one runs now
            log.info("worker %d started", child)
            _, status = os.waitpid(child, 0)
            pid, child = child, 0  # reaped: the pid may be reused, so forward nothing to it
            code = os.waitstatus_to_exitcode(status)
            if stopping:
                return code if code >= 0 else 128 - code
            if os.WIFEXITED(status) and code in NO_RESTART:
                return code
            if max_restarts is not None and restarts >= max_restarts:
                log.error("worker %d died (%s); %d restarts used, giving up", pid,
                          describe(status), restarts)
                return code if code > 0 else 1
            quick = quick + 1 if time.monotonic() - started < quick_s else 1
            delay = backoff_s(quick)
            restarts += 1
            log.warning("worker %d died (%s); restart %d%s", pid, describe(status), restarts,
                        f" in {delay:.1f} s" if delay else " now")
            if delay:
                time.sleep(delay)
            if stopping:  # asked to stop while no worker ran: do not fork another
                return 128 + stopping[0]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
