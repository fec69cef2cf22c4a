"""Shamir secret sharing over GF(p), p = 2^521 - 1 (a Mersenne prime; 32-byte secrets fit).

One polynomial of degree t-1 per secret; holder x gets f(x). Shares travel as 66-byte
big-endian integers. Any t shares give the secret back by Lagrange interpolation at 0; fewer
reveal nothing about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

P = (1 << 521) - 1
SHARE_LEN = 66


def split(values: Sequence[int], xs: Sequence[int], t: int) -> dict[int, list[int]]:
    """Shares of every value for every holder x (distinct, 1 <= x < P), threshold t."""
    if not 1 <= t <= len(xs):
        raise ValueError(f"threshold {t} with {len(xs)} holders")
    if len(set(xs)) != len(xs) or any(not 0 < x < P for x in xs):
        raise ValueError("holder coordinates must be distinct and non-zero")
    out: dict[int, list[int]] = {x: [] for x in xs}
    for value in values:
        if not 0 <= value < P:
            raise ValueError("secret out of the field")
        coeffs = [value] + [secrets.randbelow(P) for _ in range(t - 1)]
        for x in xs:
            acc = 0
            for c in reversed(coeffs):
                acc = (acc * x + c) % P
            out[x].append(acc)
    return out


def reconstruct(points: Mapping[int, Sequence[int]], t: int) -> list[int]:
    """The secrets from the first t holders' share vectors (x -> shares, all one length)."""
    xs = sorted(points)[:t]
    if len(xs) < t:
        raise ValueError(f"{len(xs)} shares, {t} needed")
    lam = []
    for x in xs:
        num, den = 1, 1
        for y in xs:
            if y != x:
                num = num * y % P
                den = den * (y - x) % P
        lam.append(num * pow(den, -1, P) % P)
    width = len(points[xs[0]])
    return [sum(lam[i] * points[x][k] for i, x in enumerate(xs)) % P for k in range(width)]


def to_bytes(values: Sequence[int]) -> bytes:
    return b"".join(v.to_bytes(SHARE_LEN, "big") for v in values)


def from_bytes(data: bytes) -> list[int]:
    if len(data) % SHARE_LEN:
        raise ValueError(f"{len(data)} bytes is not a whole number of shares")
    vals = [int.from_bytes(data[i:i + SHARE_LEN], "big") for i in range(0, len(data), SHARE_LEN)]
    if any(v >= P for v in vals):
        raise ValueError("share out of the field")
    return vals
