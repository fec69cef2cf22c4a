"""Child processes that die with their parent, whatever kills the parent.

A process that the server or a node starts (the ONNX-export child, a demo's nodes, a
supervisor's workers, a benchmark's swarm) must not outlive it: after a `kill -9` nothing runs
the parent's cleanup, and an orphan keeps its memory (an ONNX exporter holds ~460 MB) or keeps
training for nobody. On Linux the kernel can do it: `prctl(PR_SET_PDEATHSIG, SIGKILL)` in the
child makes it receive SIGKILL when its parent dies. Two pitfalls, handled here:

- the request applies to the process that calls it and survives `execve`, so a child that is
  a new program sets it in a tiny shim (`orphan_safe(argv)`: `python -I -S -c SHIM`) that
  then execs the real command;
- if the parent dies before the child asks, nobody will ever signal it: the child compares
  `getppid()` with the pid its parent had, and exits when they differ.

The signal fires when the parent THREAD that forked the child ends, not the process: spawn
children from a long-lived thread (the main thread / the event-loop thread), never from a
short-lived worker thread.

Elsewhere (macOS, Windows) these are no-ops: the parent's own cleanup is all there is.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Sequence

__all__ = ["PR_SET_PDEATHSIG", "die_with_parent", "orphan_safe"]

PR_SET_PDEATHSIG = 1
_LINUX = sys.platform.startswith("linux")

# argv: SHIM PARENT_PID CMD...; stdlib only, no site (starts in ~15 ms), then exec.
_SHIM = (
    "import ctypes,os,sys\n"
    "ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]): os._exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux).

    `parent_pid`: the pid the parent had when it started us; when our parent is already
    another process (it died before we asked), exit at once. Best effort elsewhere.
    """
    if not _LINUX:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # best effort: without it an orphan may outlive us
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def orphan_safe(argv: Sequence[str]) -> list[str]:
    """`argv` wrapped so that the program it runs gets SIGKILL when the CALLING process dies.

    Start the result with subprocess / asyncio.create_subprocess_exec as you would `argv`
    (from a long-lived thread); the pid, signals and exit status are the program's own, since
    the shim execs it. Unchanged off Linux.
    """
    if not _LINUX:
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", _SHIM, str(os.getpid()), *argv]
