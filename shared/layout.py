"""Parameter layout: one flat float32 vector in `named_parameters()` order.

The manifest (name, shape, offset, length per tensor) plus the model config hash to the
`model_id`: two runtimes with the same id agree on every byte of the vector.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from shared.frame import canonical_json


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorSlot:
    name: str  # parameter name as in named_parameters()
    shape: tuple[int, ...]  # tensor shape
    offset: int  # first index in the flat vector
    length: int  # number of values (product of shape)


def make_manifest(entries: Iterable[tuple[str, Sequence[int], int, int]]) -> tuple[TensorSlot, ...]:
    """Build and check a manifest: contiguous, in order, lengths matching shapes."""
    slots: list[TensorSlot] = []
    offset = 0
    for name, shape, off, length in entries:
        n = 1
        for d in shape:
            n *= d
        if off != offset or n != length:
            raise ValueError(f"manifest entry {name!r} is not contiguous or mis-sized")
        slots.append(TensorSlot(name=name, shape=tuple(shape), offset=off, length=length))
        offset += length
    return tuple(slots)


def manifest_json(manifest: Sequence[TensorSlot]) -> list[dict[str, Any]]:
    return [{"name": s.name, "shape": list(s.shape), "offset": s.offset, "length": s.length}
            for s in manifest]


def model_id(config: dict[str, Any], manifest: Sequence[TensorSlot]) -> str:
    """SHA-256 over the canonical JSON of config + manifest."""
    blob = canonical_json({"config": config, "manifest": manifest_json(manifest)})
    return hashlib.sha256(blob).hexdigest()
