"""Memory of a process tree from /proc (Linux; no psutil): a benchmark that starts worker
processes (Ray, a foreign framework in its own venv) reports the simultaneous peak of the
summed resident sets of the whole tree, not only its own."""

from __future__ import annotations

import contextlib
import os
import threading


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    return out


def tree_rss_mb(root: int) -> float:
    """Summed VmRSS (MiB) of `root` and all its descendants, now."""
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        todo += _children(pid)
    return total / 1024.0


class PeakSampler:
    """Simultaneous peak of tree_rss_mb(root), sampled in a thread."""

    def __init__(self, root: int, every_s: float = 0.5) -> None:
        self.root, self.every, self.peak = root, every_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss_mb(self.root))
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss_mb(self.root))


