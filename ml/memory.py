"""Hand freed heap memory back to the operating system (glibc's malloc_trim).

glibc serves allocations below its mmap threshold from the heap, and raises that threshold to
the size of the largest block freed (up to 32 MiB). After a few torch steps, the gradients,
activations and temporaries of a large model (tensors of a few MB each) are all heap blocks,
and freeing them keeps them resident: at llama 20m a node's resident set stayed ~330 MB above
what it held after its inner steps, under every later peak (encoding, the next RoundOpen);
a 125M server held ~740 MB that nothing used after creating the run and its first eval
(bench.scale_server: 2,472 MB resident, 1,731 MB after a trim). A fixed low threshold
(MALLOC_MMAP_THRESHOLD_) returns them too, but doubled the step time here (a page fault per
fresh buffer); trimming once between phases costs milliseconds. Used by native nodes (after
the steps, after encoding) and the server (after an eval, after a commit);
tests/test_memory.py shows the effect. A no-op where there is no glibc.
"""

from __future__ import annotations

import ctypes
import sys
from functools import cache
from typing import Any


@cache
def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim  # glibc; musl has none (AttributeError)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim() -> bool:
    """Return the heap's free pages to the OS; False where the C library cannot."""
    fn = _malloc_trim()
    if fn is None:
        return False
    return bool(fn(0))
