"""Byzantine attacks: pure functions over update vectors (pseudo-gradients), one registry.

Model poisoning (what a Byzantine node submits instead of its honest update):

| name      | function   | input                    | reference                                 |
|-----------|------------|--------------------------|-------------------------------------------|
| sign-flip | sign_flip  | own update               | Damaskinos et al. 2018; Allen-Zhu 2020    |
| scaled    | scaled     | own update               | Bhagoji et al. 2019 ("boosting")          |
| gaussian  | gaussian   | own update (shape)       | Blanchard et al. 2017 (Gaussian Byzantine)|
| alie      | alie       | the honest updates, n, f | Baruch, Baruch & Goldberg, NeurIPS 2019   |
| ipm       | ipm        | the honest updates       | Xie, Koyejo & Gupta, UAI 2020             |

Data poisoning: `flip_labels` (y -> C-1-y) is applied to a Byzantine node's training labels,
which then trains and submits "honestly" (Tolpegin et al. 2020; Fang et al. 2020).

Vectors follow shared.vec: numpy float32 in, numpy float32 out; `array("f")` in, `array("f")`
out. numpy is used when shared.vec.numpy_module() finds it (at call time, never at import, so
`shared` stays importable with the standard library alone); otherwise a pure-Python path.
Arithmetic is float64, rounded to float32 once.

`ATTACKS[name]` is an `Attack`: `apply(own=..., honest=..., n=..., f=..., seed=..., **params)`
with one calling convention for all, and `uses_own` telling a simulator whether the
attacker must first train to have an `own` update.
"""

from __future__ import annotations

import math
import random
import statistics
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.vec import Vector, is_numpy, numpy_module

__all__ = ["ATTACKS", "Attack", "alie", "alie_z", "flip_labels", "gaussian", "get_attack",
           "ipm", "scaled", "sign_flip"]


def _out(values: Any, like: Vector) -> Vector:
    """float64 values (numpy array or list) -> the kind of `like`, float32."""
    np = numpy_module()
    if is_numpy(like):
        assert np is not None
        return np.asarray(values, dtype=np.float64).astype(np.float32)
    if np is not None and isinstance(values, np.ndarray):
        values = values.tolist()
    return array("f", values)


def _check_finite_stack(updates: Sequence[Vector], what: str) -> int:
    if len(updates) == 0:
        raise ValueError(f"{what}: needs at least one honest update")
    d = len(updates[0])
    for i, u in enumerate(updates):
        if len(u) != d:
            raise ValueError(f"{what}: update {i} has {len(u)} values, update 0 has {d}")
    return d


def sign_flip(update: Vector, *, scale: float = 1.0) -> Vector:
    """-scale * update: the reversed-gradient attack (Damaskinos et al., "Asynchronous
    Byzantine Machine Learning", ICML 2018; Allen-Zhu et al., ICLR 2021)."""
    return scaled(update, factor=-float(scale))


def scaled(update: Vector, *, factor: float) -> Vector:
    """factor * update: a boosted (or shrunk) update (Bhagoji et al., "Analyzing Federated
    Learning through an Adversarial Lens", ICML 2019, explicit boosting)."""
    np = numpy_module()
    if np is not None and is_numpy(update):
        return _out(np.asarray(update, dtype=np.float64) * float(factor), update)
    return _out([float(factor) * float(x) for x in update], update)


def gaussian(update: Vector, *, sigma: float, seed: int, additive: bool = False) -> Vector:
    """Random N(0, sigma^2) values in place of the update (Blanchard et al., "Machine Learning
    with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017, Gaussian Byzantine
    workers); `additive=True` returns update + noise instead. Deterministic in `seed`."""
    if not sigma >= 0:
        raise ValueError(f"gaussian: sigma={sigma!r} must be >= 0")
    np = numpy_module()
    n = len(update)
    if np is not None:
        noise = np.random.default_rng(seed).normal(0.0, float(sigma), size=n)
        base = np.asarray(update, dtype=np.float64) if additive else 0.0
        return _out(base + noise, update)
    rng = random.Random(seed)
    return _out([(float(update[i]) if additive else 0.0) + rng.gauss(0.0, float(sigma))
                 for i in range(n)], update)


def alie_z(n: int, f: int) -> float:
    """z_max of "A Little Is Enough" (Baruch et al. 2019, Algorithm 3):
    s = floor(n/2 + 1) - f workers must be "won over", z = Phi^-1((n - s) / n)."""
    if n < 1 or f < 0 or f > n:
        raise ValueError(f"alie: need n >= 1 and 0 <= f <= n (got n={n}, f={f})")
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0.0 < p < 1.0:
        raise ValueError(f"alie: n={n}, f={f} gives s={s}, (n - s)/n={p} outside (0, 1)")
    return statistics.NormalDist().inv_cdf(p)


def alie(honest: Sequence[Vector], *, n: int, f: int, z: float | None = None) -> Vector:
    """"A Little Is Enough" (Baruch, Baruch & Goldberg, NeurIPS 2019): per coordinate
    mean - z_max * std of the honest updates (population std), z_max from `alie_z(n, f)`
    unless `z` is given. Every coordinate stays inside the honest spread for moderate z, so
    coordinate-wise rules (median, trimmed mean) and distance rules (Krum) keep it, while it
    consistently drags the aggregate."""
    d = _check_finite_stack(honest, "alie")
    zz = alie_z(n, f) if z is None else float(z)
    np = numpy_module()
    if np is not None:
        stack = np.asarray([np.asarray(u, dtype=np.float64) for u in honest])
        return _out(stack.mean(axis=0) - zz * stack.std(axis=0), honest[0])
    out = []
    for j in range(d):
        col = [float(u[j]) for u in honest]
        out.append(statistics.fmean(col) - zz * statistics.pstdev(col))
    return _out(out, honest[0])


def ipm(honest: Sequence[Vector], *, epsilon: float) -> Vector:
    """Inner-product manipulation (Xie, Koyejo & Gupta, "Fall of Empires: Breaking Byzantine-
    tolerant SGD by Inner Product Manipulation", UAI 2020): -epsilon * mean of the honest
    updates, so that the aggregate's inner product with the true gradient turns negative."""
    d = _check_finite_stack(honest, "ipm")
    np = numpy_module()
    if np is not None:
        stack = np.asarray([np.asarray(u, dtype=np.float64) for u in honest])
        return _out(-float(epsilon) * stack.mean(axis=0), honest[0])
    return _out([-float(epsilon) * math.fsum(float(u[j]) for u in honest) / len(honest)
                 for j in range(d)], honest[0])


def flip_labels(y: Any, n_classes: int) -> Any:
    """Label flipping, a data-poisoning attack: y -> C - 1 - y for C classes (Tolpegin et al.,
    "Data Poisoning Attacks Against Federated Learning Systems", ESORICS 2020). numpy array in,
    numpy array out (same dtype); a sequence of ints in, a list out."""
    if n_classes < 1:
        raise ValueError(f"flip_labels: n_classes={n_classes} must be >= 1")
    np = numpy_module()
    if np is not None and isinstance(y, np.ndarray):
        if y.size and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"flip_labels: labels must be in [0, {n_classes})")
        return (n_classes - 1 - y).astype(y.dtype)
    out = [n_classes - 1 - int(v) for v in y]
    if any(not 0 <= v < n_classes for v in out):
        raise ValueError(f"flip_labels: labels must be in [0, {n_classes})")
    return out


@dataclass(frozen=True)
class Attack:
    """One registry entry. `kind` is "model" (replace the update) or "data" (poison the
    training labels; `apply` returns the own update unchanged)."""

    name: str
    fn: Callable[..., Vector]
    uses_own: bool  # needs the attacker's own (trained) update
    kind: str = "model"
    defaults: dict[str, Any] = field(default_factory=dict)

    def apply(self, *, own: Vector | None = None, honest: Sequence[Vector] = (), n: int = 0,
              f: int = 0, seed: int = 0, **params: Any) -> Vector:
        return self.fn(own=own, honest=honest, n=n, f=f, seed=seed,
                       **{**self.defaults, **params})


def _need(own: Vector | None, name: str) -> Vector:
    if own is None:
        raise ValueError(f"attack {name}: needs the attacker's own update")
    return own


ATTACKS: dict[str, Attack] = {
    "sign-flip": Attack("sign-flip", lambda *, own, honest, n, f, seed, scale=1.0:
                        sign_flip(_need(own, "sign-flip"), scale=scale), uses_own=True),
    "scaled": Attack("scaled", lambda *, own, honest, n, f, seed, factor=10.0:
                     scaled(_need(own, "scaled"), factor=factor), uses_own=True),
    "gaussian": Attack("gaussian", lambda *, own, honest, n, f, seed, sigma=1.0,
                       additive=False: gaussian(_need(own, "gaussian"), sigma=sigma, seed=seed,
                                                additive=additive), uses_own=True),
    "alie": Attack("alie", lambda *, own, honest, n, f, seed, z=None:
                   alie(honest, n=n, f=f, z=z), uses_own=False),
    "ipm": Attack("ipm", lambda *, own, honest, n, f, seed, epsilon=0.1:
                  ipm(honest, epsilon=epsilon), uses_own=False),
    "label-flip": Attack("label-flip", lambda *, own, honest, n, f, seed:
                         _need(own, "label-flip"), uses_own=True, kind="data"),
}


def get_attack(name: str) -> Attack:
    try:
        return ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; known: {sorted(ATTACKS)}") from None
