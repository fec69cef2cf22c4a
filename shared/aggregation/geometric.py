"""Iterative rules: the geometric median (smoothed Weiszfeld) and centered clipping.

Both iterate a map that sums over updates, so the pure and numpy paths agree to ~1e-12
relative per step, not bit for bit (the norms are summed in a different order; numpy runs the
geometric median's iterations on the Gram matrix, see `_weiszfeld_gram`), and a permuted stack
likewise: results are within 1e-6 relative of each other, measured against the magnitude of
the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from shared.aggregation._stack import (
    Stack,
    check_f,
    check_int,
    check_positive,
    check_reference,
    prepare,
)
from shared.aggregation.coordinate import median_values
from shared.vec import Vector


class GeometricMedian(NamedTuple):
    point: Vector  # the (smoothed) geometric median, float32, of the inputs' kind
    iterations: int  # Weiszfeld steps taken
    converged: bool  # False when max_iter ran out before the tolerance was met


def geometric_median_info(updates: Sequence[Vector], *, f: int = 0, eps: float = 1e-6,
                          tol: float = 1e-7, max_iter: int = 200) -> GeometricMedian:
    """The geometric median argmin_z sum_i ||z - x_i|| by the smoothed Weiszfeld iteration of
    Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning" (RFA, 2022):

        w_i = 1 / max(eps, ||v - x_i||),   v <- sum_i w_i x_i / sum_i w_i

    starting from the coordinate-wise median. eps (in the units of the updates) smooths the
    objective where v meets an update, so no weight is infinite. Stops when a step moves v by
    at most tol times the mean distance from v to the updates (a scale-free test), or after
    max_iter steps (then converged is False). f is accepted and ignored: the geometric median
    tolerates up to (n - 1) // 2 arbitrary updates."""
    stack = prepare(updates, "geometric-median")
    check_f("geometric-median", f, stack.n)
    eps = check_positive("geometric-median", "eps", eps)
    tol = check_positive("geometric-median", "tol", tol)
    max_iter = check_int("geometric-median", "max_iter", max_iter, low=1)
    v: Any = median_values(stack, range(stack.n))
    if stack.np is not None:
        return _weiszfeld_gram(stack, v, eps, tol, max_iter)
    return _explicit(stack, v, eps, tol, max_iter, 1)


def _weiszfeld_gram(stack: Stack, v0: Any, eps: float, tol: float,
                    max_iter: int) -> GeometricMedian:
    """Numpy path of the same iteration, in the n coefficients of v = v0 + sum_j a_j (x_j - v0)
    (every Weiszfeld point past v0 is such an affine combination, sum_j a_j = 1): with the
    Gram matrix G of the rows centered on v0 (one pass over the stack),

        ||x_i - v||^2 = G_ii - 2 (G a)_i + a.G.a,   ||v' - v||^2 = (a' - a).G.(a' - a),

    so each step costs O(n^2), and v is built once at the end (a second pass). Where a
    distance is small next to the terms that cancel in it (v within ~1e-4 of the spread from
    an update), the step is taken explicitly from v instead (`_explicit_step`)."""
    np = stack.np
    assert np is not None
    n = stack.n
    G = stack.gram(center=v0)
    g = G.diagonal().copy()
    a = np.zeros(n)  # v = v0
    ga = np.zeros(n)  # G a
    q = 0.0  # a.G.a
    for it in range(1, max_iter + 1):
        d2 = g - 2.0 * ga + q
        if (d2 < 1e-8 * (g + q)).any():  # cancellation: distances from v itself
            v = _point(stack, v0, a)
            return _explicit(stack, v, eps, tol, max_iter, it)
        dist = np.sqrt(d2)
        weights = 1.0 / np.maximum(eps, dist)
        new = weights / math.fsum(weights.tolist())
        delta = new - a
        step = math.sqrt(max(float(delta @ G @ delta), 0.0))
        a, ga = new, G @ new
        q = float(a @ ga)
        if step <= tol * math.fsum(dist.tolist()) / n:
            return GeometricMedian(stack.vector(_point(stack, v0, a)), it, True)
    return GeometricMedian(stack.vector(_point(stack, v0, a)), max_iter, False)


def _point(stack: Stack, v0: Any, a: Any) -> Any:
    """v0 + sum_j a_j (x_j - v0), float64 values."""
    out: Any = stack.weighted_sum(a.tolist(), center=v0)
    out += v0  # in place (the same sums: addition commutes), no third vector
    return out


def _explicit(stack: Stack, v: Any, eps: float, tol: float, max_iter: int,
              first: int) -> GeometricMedian:
    """The iteration with distances measured from v itself (both backends' form)."""
    for it in range(first, max_iter + 1):
        dist = stack.norms(v)
        weights = [1.0 / max(eps, x) for x in dist]
        total = math.fsum(weights)
        acc = stack.weighted_sum(weights)
        new = acc / total if stack.np is not None else [a / total for a in acc]
        step = _distance(stack.np, new, v)
        v = new
        if step <= tol * math.fsum(dist) / stack.n:
            return GeometricMedian(stack.vector(v), it, True)
    return GeometricMedian(stack.vector(v), max_iter, False)


def geometric_median(updates: Sequence[Vector], *, f: int = 0, eps: float = 1e-6,
                     tol: float = 1e-7, max_iter: int = 200) -> Vector:
    """The geometric median (smoothed Weiszfeld, Pillutla et al. RFA); see
    `geometric_median_info`, which also reports the iterations taken."""
    return geometric_median_info(updates, f=f, eps=eps, tol=tol, max_iter=max_iter).point


def _distance(np: Any, a: Any, b: Any) -> float:
    if np is not None:
        diff = a - b
        return float(np.sqrt((diff * diff).sum()))
    return math.sqrt(math.fsum([(x - y) * (x - y) for x, y in zip(a, b, strict=True)]))


def centered_clipping(updates: Sequence[Vector], *, f: int = 0, tau: float = 10.0,
                      iterations: int = 1, reference: Vector | None = None) -> Vector:
    """Centered clipping (Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
    Optimization", ICML 2021): starting from v = reference, repeat `iterations` times

        v <- v + (1/n) sum_i clip_tau(x_i - v),   clip_tau(z) = z * min(1, tau / ||z||)

    and return v. Each step moves v by at most tau.

    The reference is CALLER state: the paper starts from the previous round's aggregate (the
    server momentum), so pass it in each round; None means the zero vector. The paper's
    robustness also relies on worker momentum (each worker sends a momentum of its updates,
    not a raw update); that is the caller's job too, not this function's. tau (in the units
    of the updates) has no universal default: 10.0 here. f is accepted and ignored."""
    stack = prepare(updates, "centered-clipping")
    check_f("centered-clipping", f, stack.n)
    tau = check_positive("centered-clipping", "tau", tau)
    iterations = check_int("centered-clipping", "iterations", iterations, low=1)
    v = check_reference(stack, reference)
    n = stack.n
    at_zero = reference is None  # v = 0: x - v = x, and numpy skips the subtractions
    for _ in range(iterations):
        center = None if at_zero and stack.np is not None else v
        norms = stack.norms(center)
        scale = [tau / x if x > tau else 1.0 for x in norms]
        acc = stack.weighted_sum(scale, center=center)
        at_zero = False
        if stack.np is not None:  # v + acc / n, in place in acc (a fresh array)
            acc /= n
            acc += v
            v = acc
        else:
            v = [c + a / n for c, a in zip(v, acc, strict=True)]
    return stack.vector(v)
