"""Fixed-point encoding of float updates in Z_2^32, with headroom for the sum.

A value x is clipped to [-clip, clip] and encoded as round(x * 2^frac_bits) mod 2^32. The sum
of n encoded values decodes exactly (as a signed 32-bit integer) while
    n * clip * 2^frac_bits <= 2^31 - 1,
which `FixedPoint.for_sum` guarantees by choosing frac_bits; `check_parties` refuses more.
The per-value rounding error is at most 2^-(frac_bits+1), so the sum's is n times that.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass

from shared.secagg.prg import MASK32, Ring, is_numpy_ring
from shared.vec import Vector, is_numpy, numpy_module

RING_BITS = 32
LIMIT = (1 << (RING_BITS - 1)) - 1


@dataclass(frozen=True, kw_only=True, slots=True)
class FixedPoint:
    clip: float  # every value is clipped to [-clip, clip] before encoding
    frac_bits: int  # scale 2^frac_bits
    max_parties: int  # the most updates whose sum must decode exactly

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError("clip must be a positive finite number")
        if self.max_parties < 1 or self.frac_bits < 0:
            raise ValueError("max_parties >= 1 and frac_bits >= 0")
        if self.max_parties * math.ceil(self.clip * 2 ** self.frac_bits) > LIMIT:
            raise ValueError(f"{self.max_parties} values of |x| <= {self.clip} at 2^"
                             f"{self.frac_bits} overflow a signed 32-bit sum")

    @classmethod
    def for_sum(cls, clip: float, max_parties: int) -> FixedPoint:
        """The finest scale whose sum of `max_parties` clipped values cannot overflow."""
        bits = math.floor(math.log2(LIMIT / (max_parties * clip)))
        while bits > 0 and max_parties * math.ceil(clip * 2 ** bits) > LIMIT:
            bits -= 1
        return cls(clip=clip, frac_bits=max(bits, 0), max_parties=max_parties)

    @property
    def scale(self) -> float:
        return float(2 ** self.frac_bits)

    def encode(self, values: Vector) -> Ring:
        """Vector of floats -> ring vector (numpy uint32 for numpy input, else array("I"))."""
        if is_numpy(values):
            np = numpy_module()
            assert np is not None
            x = np.clip(np.asarray(values, dtype=np.float64), -self.clip, self.clip)
            if not np.isfinite(x).all():
                raise ValueError("NaN in the update")
            q = np.rint(x * self.scale).astype(np.int64)
            return (q & MASK32).astype(np.uint32)
        out = array("I", bytes(4 * len(values)))
        for i, v in enumerate(values):
            if v != v:
                raise ValueError("NaN in the update")
            c = min(max(float(v), -self.clip), self.clip)
            out[i] = round(c * self.scale) & MASK32
        return out

    def decode_sum(self, ring: Ring, parties: int) -> Vector:
        """Ring sum of `parties` encoded updates -> float64 (numpy) / float (array "d")."""
        if parties > self.max_parties:
            raise ValueError(f"{parties} updates exceed max_parties {self.max_parties}")
        if is_numpy_ring(ring):
            np = numpy_module()
            assert np is not None
            return ring.astype(np.uint32).view(np.int32).astype(np.float64) / self.scale
        return array("d", [((v ^ 0x80000000) - 0x80000000) / self.scale for v in ring])
