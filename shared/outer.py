"""The outer optimizer: SGD with Nesterov momentum on the aggregated pseudo-gradient.

DiLoCo (Douillard et al. 2023) defaults: outer lr 0.7, momentum 0.9, Nesterov. Same update
as `torch.optim.SGD(lr, momentum, nesterov=True)` with no dampening or weight decay:

    m'     = mu * m + g
    theta' = theta - lr * (g + mu * m')

Pure function; the caller stores (theta', m') together (the momentum is checkpointed).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.vec import Vector, is_numpy, numpy_module, same_kind


@dataclass(frozen=True, kw_only=True, slots=True)
class OuterConfig:
    lr: float = 0.7  # outer learning rate
    momentum: float = 0.9  # Nesterov momentum
    nesterov: bool = True  # False gives plain heavy-ball momentum


def outer_step(theta: Vector, grad: Vector, momentum: Vector,
               config: OuterConfig = OuterConfig()) -> tuple[Vector, Vector]:
    """One outer step. Returns (new theta, new momentum); the inputs are not modified."""
    if not (len(theta) == len(grad) == len(momentum)):
        raise ValueError(f"length mismatch: theta {len(theta)}, grad {len(grad)}, "
                         f"momentum {len(momentum)}")
    lr, mu = config.lr, config.momentum
    if is_numpy(theta):
        np = numpy_module()
        assert np is not None
        g = np.asarray(grad, dtype=np.float32)
        m = (np.float32(mu) * np.asarray(momentum, dtype=np.float32) + g).astype(np.float32)
        step = g + np.float32(mu) * m if config.nesterov else m
        return (theta - np.float32(lr) * step).astype(np.float32), m
    new_m = [mu * mi + gi for mi, gi in zip(momentum, grad, strict=True)]
    if config.nesterov:
        new_t = [t - lr * (gi + mu * mi) for t, gi, mi in zip(theta, grad, new_m, strict=True)]
    else:
        new_t = [t - lr * mi for t, mi in zip(theta, new_m, strict=True)]
    return same_kind(theta, new_t), same_kind(theta, new_m)


def history_reference(momentum: Vector, mu: float) -> Vector:
    """Centered clipping's start for the next round, from the outer momentum buffer alone
    (so it is checkpointed with it): (1 - mu) * m, the exponentially weighted mean of past
    aggregates (m = sum_k mu^k g_(t-k)); exactly the previous round's aggregate when mu = 0.
    Karimireddy et al. (2021) start from the previous aggregate, their server momentum."""
    if is_numpy(momentum):
        np = numpy_module()
        assert np is not None
        return (np.float32(1.0 - mu) * np.asarray(momentum, dtype=np.float32)).astype(np.float32)
    return same_kind(momentum, [(1.0 - mu) * x for x in momentum])


def worker_momentum(previous: Vector | None, delta: Vector, beta: float) -> Vector:
    """A worker's momentum of its pseudo-gradients (Karimireddy et al. 2021, the worker side of
    centered clipping): m = beta * m + (1 - beta) * delta, started at the first delta (no
    zero-start bias). beta = 0 returns delta itself. What the worker then encodes and sends."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"worker momentum beta must be in [0, 1), not {beta}")
    if beta == 0.0 or previous is None or len(previous) != len(delta):
        return delta
    if is_numpy(delta):
        np = numpy_module()
        assert np is not None
        prev = np.asarray(previous, dtype=np.float32)
        return (np.float32(beta) * prev + np.float32(1.0 - beta) * delta).astype(np.float32)
    return same_kind(delta, [beta * p + (1.0 - beta) * d
                             for p, d in zip(previous, delta, strict=True)])
