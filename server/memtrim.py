"""Give the allocator's free memory back to the OS (glibc `malloc_trim`), after a large
model's transient arrays are gone.

glibc serves allocations below its mmap threshold (which grows up to 32 MB as large blocks are
freed) from heap arenas and keeps the freed pages resident: after a 125M model's creation and
first eval the server held ~740 MB that nothing used (bench.scale_server: 2,472 MB resident,
1,731 MB after a trim). A no-op where there is no glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_free_memory() -> bool:
    """Return freed heap pages to the OS; True when something was released."""
    fn = _trim()
    return bool(fn(0)) if fn is not None else False
