"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018) as pure functions.

Each sampled participant clips its whole pseudo-gradient to L2 norm `clip` (C) and adds its
share of Gaussian noise, N(0, sigma^2 C^2 / m) per coordinate, so that the sum over the round's
m participants carries N(0, sigma^2 C^2): the Gaussian mechanism with sensitivity C on the
sum ("distributed noise"). That guarantee needs the sum to be secure-aggregated (the server
sees only the sum) and every participant to add its share honestly; see docs/privacy.md.

Stdlib only at import time (this runs in Pyodide). Natively the vector is a numpy array
(shared.vec) and numpy draws the noise from a generator seeded with 256 bits of OS entropy; in
the tab it is an array('f') and `random.Random` seeded the same way draws it (a Mersenne
Twister: not a cryptographic generator, as numpy's PCG64 is not; neither path defends against
floating-point attacks on the Gaussian sampler, Mironov 2012).
"""

from __future__ import annotations

import hashlib
import math
import random
import secrets
from array import array
from collections.abc import Sequence

from shared.vec import Vector, is_numpy, l2_norm, numpy_module


def clip_factor(norm: float, clip: float) -> float:
    """min(1, C / ||x||): the factor that brings a vector of L2 norm `norm` within `clip`."""
    if clip <= 0 or not math.isfinite(clip):
        raise ValueError(f"clip must be a positive number, got {clip!r}")
    return 1.0 if norm <= clip else clip / norm


def noise_std(clip: float, sigma: float, participants: int) -> float:
    """Per-coordinate noise std one of `participants` adds: sigma * C / sqrt(m), so that the
    sum of m independent shares has std sigma * C."""
    if sigma < 0 or participants < 1:
        raise ValueError(f"sigma must be >= 0 and participants >= 1 (got {sigma}, "
                         f"{participants})")
    return sigma * clip / math.sqrt(participants)


def clip_vector(v: Vector, clip: float) -> tuple[Vector, float]:
    """(v scaled to L2 norm <= clip, the norm before clipping); the kind of `v` is kept."""
    norm = l2_norm(v)
    f = clip_factor(norm, clip)
    if f == 1.0:
        return v, norm
    if is_numpy(v):
        np = numpy_module()
        assert np is not None
        return (v.astype(np.float64) * f).astype(np.float32), norm
    return array("f", [x * f for x in v]), norm


def gaussian_noise(n: int, std: float, *, like: Vector, seed: int | None = None) -> Vector:
    """n draws of N(0, std^2) as the kind of vector `like` is (seed None: OS entropy)."""
    seed = secrets.randbits(256) if seed is None else seed
    if is_numpy(like):
        np = numpy_module()
        assert np is not None
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
        return rng.normal(0.0, std, n).astype(np.float32)
    rnd = random.Random(seed)
    gauss = rnd.gauss
    return array("f", [gauss(0.0, std) for _ in range(n)])


def privatize(delta: Vector, *, clip: float, sigma: float, participants: int,
              seed: int | None = None) -> tuple[Vector, float]:
    """One participant's DP step: clip `delta` to `clip`, add its noise share. Returns the
    privatized vector (the kind of `delta`) and the norm before clipping."""
    clipped, norm = clip_vector(delta, clip)
    std = noise_std(clip, sigma, participants)
    if std == 0:
        return clipped, norm
    noise = gaussian_noise(len(clipped), std, like=clipped, seed=seed)
    if is_numpy(clipped):
        return (clipped + noise).astype(clipped.dtype), norm
    return array("f", [x + z for x, z in zip(clipped, noise, strict=True)]), norm


def sampled(seed: int, round_: int, draw: int, node_id: str, rate: float) -> bool:
    """Whether `node_id` trains in `round_` (its `draw`-th sampling): an independent
    Bernoulli(rate) per node (Poisson sampling), decided by SHA-256 of (seed, round, draw,
    node) so that anyone holding the seed can check the server's choice."""
    if not 0 < rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {rate!r}")
    h = hashlib.sha256(f"dp-sample|{seed}|{round_}|{draw}|{node_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") < rate * 2.0 ** 64


def poisson_sample(seed: int, round_: int, nodes: Sequence[str], rate: float,
                   *, first_draw: int = 0, max_draws: int = 1000) -> tuple[list[str], int]:
    """The round's participants among `nodes` and the number of draws it took: a draw that
    picks nobody is drawn again (each draw is one step for the accountant, which is
    conservative: an empty draw releases nothing), starting at draw `first_draw`. ([], 0)
    if `nodes` is empty; ([], max_draws) if every draw came out empty."""
    if not nodes:
        return [], 0
    for k in range(max_draws):
        picked = [n for n in nodes if sampled(seed, round_, first_draw + k, n, rate)]
        if picked:
            return picked, k + 1
    return [], max_draws
