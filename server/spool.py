"""Streamed updates on disk: the spool folder, and aggregation from it in column blocks.

`Spool` is one folder in the run's data dir (`spool/`). A streamed update is written there
chunk by chunk as it arrives (`<node>-<round>-<digest16>.part`, preallocated to its size);
once complete and decoded, its float32 vector is stored as `<node>-<round>.f32` and read
back as a read-only `np.memmap`, so the server holds no update of the round in its memory.
The files of a round are deleted once it commits (`clear`).

`blockwise` applies a coordinate-wise rule (mean, median, trimmed mean: each output
coordinate depends on that coordinate of every update only) to a list of vectors, memmaps
included, one block of columns at a time: the rule function is the run's own
(shared.aggregation), called on the slices, so the result is the same as on the whole stack,
and the memory it needs is n_updates x block values, whatever the model size. The rules
that need every update at once (Krum family, geometric median, centered clipping) and the
stake / step-weighted mean read the files by blocks in server/spool_rules.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("server.spool")
COORDINATE_RULES = frozenset({"mean", "median", "trimmed-mean"})
BLOCK_BUDGET = 64 * 2**20  # bytes of update columns one block of `blockwise` reads


class Spool:
    """The spool folder of one run (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.iterdir():  # a crashed server's partial files: not resumable
            with contextlib.suppress(OSError):
                stale.unlink()

    def part_path(self, node_id: str, round_: int, digest: str) -> Path:
        return self.root / f"{node_id}-{round_}-{digest[:16]}.part"

    def open_part(self, path: Path, size: int) -> Any:
        """A new partial file of `size` bytes (sparse), open for writing at offsets."""
        fh = open(path, "w+b")  # noqa: SIM115 - closed by the transfer (server.streams)
        fh.truncate(size)
        return fh

    def store_vector(self, node_id: str, round_: int, vec: np.ndarray) -> np.ndarray:
        """`vec` written to the spool; a read-only float32 memmap of it."""
        path = self.root / f"{node_id}-{round_}.f32"
        arr = np.ascontiguousarray(vec, dtype="<f4")
        with open(path, "wb") as fh:
            arr.tofile(fh)
        return np.memmap(path, dtype="<f4", mode="r", shape=arr.shape)

    def files(self) -> list[Path]:
        return sorted(self.root.iterdir())

    def clear(self, keep: Callable[[Path], bool] | None = None) -> int:
        """Delete the spool's files (but those `keep` says to keep); how many went."""
        gone = 0
        for path in self.files():
            if keep is not None and keep(path):
                continue
            with contextlib.suppress(OSError):
                os.unlink(path)
                gone += 1
        return gone


def block_values(n_updates: int, budget: int = BLOCK_BUDGET) -> int:
    """Columns per block so that one block of every update reads about `budget` bytes."""
    return max(1024, budget // (4 * max(1, n_updates)))


def blockwise(rule: Callable[..., Any], vectors: Sequence[np.ndarray], *, block: int,
              **params: Any) -> np.ndarray:
    """`rule(vectors, **params)` for a coordinate-wise rule, one block of columns at a time
    (see the module doc)."""
    n = len(vectors[0])
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        cols = [read_block(v, start, stop) for v in vectors]
        out[start:stop] = np.asarray(rule(cols, **params), dtype=np.float32)
    return out


def read_block(v: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Values [start, stop) of `v` as a new float32 array. A spooled vector's are read from
    its file (not through its mapping: mapped pages would stay in the server's resident set,
    and a round's blocks would add up to every update)."""
    name = getattr(v, "filename", None)
    if isinstance(v, np.memmap) and name is not None and v.dtype == np.dtype("<f4"):
        out = np.fromfile(name, dtype="<f4", count=stop - start, offset=4 * start)
        return out.astype(np.float32, copy=False)
    return np.array(v[start:stop], dtype=np.float32)


def spooled(vectors: Sequence[np.ndarray]) -> bool:
    """Whether any of the round's vectors lives on disk (a streamed update)."""
    return any(isinstance(v, np.memmap) for v in vectors)
