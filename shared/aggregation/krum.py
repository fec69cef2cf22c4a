"""Distance-based selection: Krum, multi-Krum (Blanchard et al. 2017) and Bulyan (El Mhamdi
et al. 2018).

Krum's score of update i is the sum of the squared Euclidean distances from i to its
n - f - 2 nearest neighbours (the other updates closest to it), as in Blanchard et al.,
"Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017 (and
Flower). Some libraries sum over n - f - 1 neighbours instead; we follow the paper. Krum
needs n >= 2f + 3 (n > 2f + 2 in the paper).

Ties: candidates are ranked by (score, vector in lexicographic order, index). Breaking exact
ties by the vector rather than by position makes every result here depend only on the
multiset of updates, never on the order of the stack (identical vectors are interchangeable).

Both backends compute the distance matrix (`Stack.sq_distances`: a centered Gram product on
numpy, math.fsum of squared differences in pure Python; ~1e-15 relative to the largest
distance apart, equal when exact) and then share ONE selection routine over it; the averaging
is bit-identical. So the pure and numpy paths pick the same updates and give
bit-identical results, except when two scores tie within that rounding (a near-tie); scores
always agree to ~1e-12 relative.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cmp_to_key

from shared.aggregation._stack import Stack, check_f, check_int, prepare
from shared.aggregation.coordinate import mean_around_median
from shared.vec import Vector


def _scores(dist: list[list[float]], cand: Sequence[int], k: int) -> dict[int, float]:
    """Per candidate: the sum (ascending, left to right) of its k smallest squared distances
    to the other candidates."""
    out: dict[int, float] = {}
    for i in cand:
        row = dist[i]
        near = sorted([row[j] for j in cand if j != i])[:k]
        s = 0.0
        for x in near:
            s += x
        out[i] = s
    return out


def _ranked(stack: Stack, scores: dict[int, float]) -> list[int]:
    """Candidates by (score, vector lexicographically, index)."""
    def cmp(i: int, j: int) -> int:
        if scores[i] != scores[j]:
            return -1 if scores[i] < scores[j] else 1
        return stack.lex_cmp(i, j) or (i > j) - (i < j)

    return sorted(scores, key=cmp_to_key(cmp))


def _krum_stack(updates: Sequence[Vector], rule: str, f: int) -> tuple[Stack, int,
                                                                      list[list[float]]]:
    stack = prepare(updates, rule)
    f = check_f(rule, f, stack.n, min_n=(2, 3))
    return stack, f, stack.sq_distances()


def krum_scores(updates: Sequence[Vector], *, f: int = 0) -> list[float]:
    """Krum score of every update (lower is more central): the sum of squared distances to
    its n - f - 2 nearest neighbours (Blanchard et al. 2017; not n - f - 1). Needs
    n >= 2f + 3."""
    stack, f, dist = _krum_stack(updates, "krum", f)
    scores = _scores(dist, range(stack.n), stack.n - f - 2)
    return [scores[i] for i in range(stack.n)]


def krum(updates: Sequence[Vector], *, f: int = 0) -> int:
    """Index of the update Krum selects: the lowest score, where the score of an update is the
    sum of its squared distances to its n - f - 2 nearest neighbours (Blanchard et al. 2017;
    some libraries use n - f - 1). Needs n >= 2f + 3. Exact ties go to the lexicographically
    smallest vector."""
    stack, f, dist = _krum_stack(updates, "krum", f)
    return _ranked(stack, _scores(dist, range(stack.n), stack.n - f - 2))[0]


def krum_aggregate(updates: Sequence[Vector], *, f: int = 0) -> Vector:
    """The Krum rule as an aggregator: a copy of the update `krum` selects."""
    stack, f, dist = _krum_stack(updates, "krum", f)
    return stack.row_vector(_ranked(stack, _scores(dist, range(stack.n), stack.n - f - 2))[0])


def _multi_krum(updates: Sequence[Vector], f: int, m: int | None) -> tuple[Stack, list[int]]:
    stack, f, dist = _krum_stack(updates, "multi-krum", f)
    n = stack.n
    m = n - f if m is None else check_int("multi-krum", "m", m, low=1, high=n)
    return stack, _ranked(stack, _scores(dist, range(n), n - f - 2))[:m]


def multi_krum_select(updates: Sequence[Vector], *, f: int = 0,
                      m: int | None = None) -> list[int]:
    """Indices of the m updates with the best Krum scores (n - f - 2 neighbours, scored once
    over the whole stack), best first. m defaults to n - f. Needs n >= 2f + 3."""
    return _multi_krum(updates, f, m)[1]


def multi_krum(updates: Sequence[Vector], *, f: int = 0, m: int | None = None) -> Vector:
    """Multi-Krum (Blanchard et al. 2017): the mean of the m updates with the best Krum scores
    (n - f - 2 nearest neighbours; some libraries use n - f - 1). m defaults to n - f; m = 1
    is Krum. Needs n >= 2f + 3. The selected updates are summed best first."""
    stack, chosen = _multi_krum(updates, f, m)
    return stack.vector(stack.mean_of(chosen))


def _bulyan(updates: Sequence[Vector], f: int) -> tuple[Stack, int, list[int]]:
    stack = prepare(updates, "bulyan")
    f = check_f("bulyan", f, stack.n, min_n=(4, 3))
    dist = stack.sq_distances()
    remaining = list(range(stack.n))
    chosen: list[int] = []
    for _ in range(stack.n - 2 * f):
        r = len(remaining)
        # Krum on what is left, n - f - 2 neighbours with n = r. Late rounds get down to
        # r = 2f + 1 (f - 1 neighbours); keep at least one, since a score over no neighbours
        # is constant and the pick would be arbitrary.
        k = min(max(r - f - 2, 1), r - 1)
        best = _ranked(stack, _scores(dist, remaining, k))[0]
        chosen.append(best)
        remaining.remove(best)
    return stack, f, chosen


def bulyan_select(updates: Sequence[Vector], *, f: int = 0) -> list[int]:
    """Indices of the theta = n - 2f updates Bulyan's first stage picks, in pick order."""
    return _bulyan(updates, f)[2]


def bulyan(updates: Sequence[Vector], *, f: int = 0) -> Vector:
    """Bulyan (El Mhamdi, Guerraoui, Rouault 2018, "The Hidden Vulnerability of Distributed
    Learning in Byzantium"). Needs n >= 4f + 3.

    1. Select theta = n - 2f updates by repeated Krum: pick the Krum winner among the
       remaining updates (n - f - 2 neighbours with n = what remains, at least one), remove
       it, repeat.
    2. Per coordinate, average the beta = theta - 2f selected values closest to the median of
       the selected values (distance ties keep the smaller value)."""
    stack, f, chosen = _bulyan(updates, f)
    return stack.vector(mean_around_median(stack, chosen, len(chosen) - 2 * f))
