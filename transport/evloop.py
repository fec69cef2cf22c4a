"""The event loop the native processes (node, server, benches) run on, chosen here only.

uvloop (libuv) when it is installed, else asyncio's own loop; DAA_EVENT_LOOP=asyncio forces
asyncio's. The WebRTC data plane is bound by per-packet work: every 1,200-byte SCTP packet is
a datagram read, a wake-up and callbacks. uvloop does the socket and scheduling part of that
in C. aiortc <-> aiortc in two processes measured 21-25 MB/s on asyncio's loop and 30-35 MB/s
on uvloop, in interleaved runs (docs/benchmarks.md). Nothing else depends on the choice:
aiohttp, aiortc and subprocesses run the same on both.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def name() -> str:
    """"uvloop" or "asyncio": what `run` uses in this process."""
    if os.environ.get("DAA_EVENT_LOOP", "").lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main), on uvloop when `name()` says so."""
    if name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
