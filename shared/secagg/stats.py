"""A goodness-of-fit check of what the aggregator sees: Pearson's chi-square over the 256
byte values of a masked update, against the uniform distribution (p-value from the
regularized upper incomplete gamma function; stdlib only)."""

from __future__ import annotations

import math
from collections import Counter


def _gammaincc(a: float, x: float) -> float:
    """Q(a, x) = Gamma(a, x) / Gamma(a) (Numerical Recipes: series / continued fraction)."""
    if x <= 0:
        return 1.0
    lg = math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(-x + a * math.log(x) - lg))
    b, c, d = x + 1 - a, 1e300, 1 / (x + 1 - a)
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return math.exp(-x + a * math.log(x) - lg) * h


def chi_square_uniform_p(counts: list[int]) -> float:
    total, k = sum(counts), len(counts)
    expected = total / k
    stat = sum((c - expected) ** 2 / expected for c in counts)
    return _gammaincc((k - 1) / 2, stat / 2)


def byte_uniformity_p(data: bytes) -> float:
    """p-value that the bytes of `data` are uniform over 0..255 (Pearson, 255 d.o.f.)."""
    if not data:
        raise ValueError("no data")
    c = Counter(data)
    return chi_square_uniform_p([c.get(i, 0) for i in range(256)])


def ks_uniform_p(values: list[float]) -> float:
    """Kolmogorov-Smirnov p-value that `values` are uniform on [0, 1] (asymptotic series)."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    d = max(max((i + 1) / n - x, x - i / n) for i, x in enumerate(xs))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    p = 2 * sum((-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam) for j in range(1, 101))
    return float(min(1.0, max(0.0, p)))
