"""The embedded demo: N local native nodes as child processes, and the per-round line."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

from transport.lifetime import orphan_safe


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def round_line(rec: dict[str, Any]) -> str:
    """One line per committed round: round (and how many are committed, the chart's x),
    eval loss, entropy floor, bytes moved."""
    loss = rec.get("eval_loss")
    floor = rec.get("entropy_floor")
    # rounds count from 0; the page's chart counts commits from 1: say both
    parts = [f"round {rec['round']:>4} ({rec['round'] + 1} committed)",
             f"eval loss {loss:.4f}" if loss is not None else "eval loss n/a",
             f"floor {floor:.4f}" if floor is not None else "floor n/a",
             f"updates {rec['n_updates']}",
             f"up {human_bytes(rec['bytes_up'])}",
             f"down {human_bytes(rec['bytes_down'])}",
             f"{rec['duration_s']:.1f} s"]
    return " | ".join(parts)


class DemoSwarm:
    """Start and stop N `python -m native_node join` children (they die with the server,
    even on `kill -9`: transport.lifetime.orphan_safe)."""

    def __init__(self, n: int, coordinator: str, log_dir: Path) -> None:
        self.n = n
        self.coordinator = coordinator
        self.log_dir = log_dir
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        for i in range(self.n):
            with open(self.log_dir / f"node-{i}.log", "ab") as log:
                proc = await asyncio.create_subprocess_exec(
                    *orphan_safe([sys.executable, "-m", "native_node", "join", "--coordinator",
                                  self.coordinator, "--name", f"demo-{i}", "--threads", "1",
                                  "--quiet"]),
                    stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
            self.procs.append(proc)
        print(f"started {self.n} local native node(s); their logs: "
              f"{self.log_dir}/node-*.log", flush=True)

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), timeout=5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self.procs.clear()
