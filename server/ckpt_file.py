"""Checkpoint files written from the arrays themselves, with no serialized copy in memory.

`safetensors.numpy.save` returns the whole file as one bytes object (params + outer momentum:
8 bytes a parameter, ~1 GB at 125M) and hashing `a.tobytes()` makes another copy: at the
commit of a large model these were the server's biggest transient allocations (bench.scale).
Here the file is the same safetensors format (8-byte little-endian header length, the JSON
header padded with spaces to a multiple of 8, then the raw tensors, `__metadata__` strings
included), read back by `safe_open` as before, and written part by part from memoryviews of
the arrays; the digest is taken over the same views.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from shared.messages import sha256_hex


def f32_view(a: np.ndarray) -> memoryview:
    """The little-endian float32 bytes of `a` (no copy when it is already such an array)."""
    return np.ascontiguousarray(a, dtype="<f4").reshape(-1).data.cast("B")


def f32_digest(a: np.ndarray) -> str:
    """SHA-256 hex of `a`'s little-endian float32 bytes, as sha256_hex(a.tobytes())."""
    return sha256_hex(f32_view(a))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_parts(path: Path, parts: Iterable[bytes | memoryview]) -> None:
    """temp file + fsync + rename + fsync(dir), the file being `parts` one after another."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        for part in parts:
            fh.write(part)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_f32(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """`tensors` (float32, any shape) as a safetensors file at `path`, atomically."""
    views = {name: f32_view(a) for name, a in sorted(tensors.items())}
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, view in views.items():
        header[name] = {"dtype": "F32", "shape": list(np.shape(tensors[name])),
                        "data_offsets": [offset, offset + view.nbytes]}
        offset += view.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    atomic_write_parts(path, [struct.pack("<Q", len(text)), text, *views.values()])
