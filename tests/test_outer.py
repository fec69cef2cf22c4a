"""Tests for the numeric core: shared.outer, shared.aggregation, shared.vec."""

from __future__ import annotations

import math
import struct
from array import array

import numpy as np
import pytest
import torch

from shared.aggregation import RULES, get_rule, mean
from shared.outer import OuterConfig, history_reference, outer_step, worker_momentum
from shared.vec import Vector, all_finite, from_bytes, l2_norm, same_kind, to_bytes, zeros_like


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a64 - b64)) / max(float(np.linalg.norm(b64)), 1e-30)


# -- outer step --------------------------------------------------------------------------------
def test_outer_step_matches_torch_sgd_nesterov() -> None:
    rng = np.random.default_rng(0)
    n, steps = 1000, 5
    theta0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) * 0.1 for _ in range(steps)]

    param = torch.nn.Parameter(torch.from_numpy(theta0.copy()))
    opt = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=True)
    theta, mom = theta0.copy(), np.zeros(n, dtype=np.float32)
    for g in grads:
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        theta, mom = outer_step(theta, g, mom, OuterConfig(lr=0.7, momentum=0.9))
        assert theta.dtype == np.float32
        assert mom.dtype == np.float32
        expected = param.detach().numpy()
        assert rel_err(theta, expected) < 1e-6
        buf = opt.state[param]["momentum_buffer"].numpy()
        assert rel_err(mom, buf) < 1e-6
    assert rel_err(theta, theta0) > 1e-3  # it did move


def test_outer_step_matches_torch_heavy_ball() -> None:
    rng = np.random.default_rng(1)
    theta0 = rng.standard_normal(64).astype(np.float32)
    param = torch.nn.Parameter(torch.from_numpy(theta0.copy()))
    opt = torch.optim.SGD([param], lr=0.5, momentum=0.8, nesterov=False)
    theta, mom = theta0.copy(), np.zeros(64, dtype=np.float32)
    cfg = OuterConfig(lr=0.5, momentum=0.8, nesterov=False)
    for _ in range(4):
        g = rng.standard_normal(64).astype(np.float32)
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        theta, mom = outer_step(theta, g, mom, cfg)
        assert rel_err(theta, param.detach().numpy()) < 1e-6


def test_outer_step_hand_case() -> None:
    theta = np.array([1.0, 2.0], dtype=np.float32)
    grad = np.array([0.5, -1.0], dtype=np.float32)
    mom = np.array([0.1, 0.2], dtype=np.float32)
    new_t, new_m = outer_step(theta, grad, mom, OuterConfig(lr=0.5, momentum=0.5))
    # m' = 0.5*m + g = [0.55, -0.9]; theta' = theta - 0.5*(g + 0.5*m') = [0.6125, 2.725]
    np.testing.assert_allclose(new_m, [0.55, -0.9], rtol=1e-6)
    np.testing.assert_allclose(new_t, [0.6125, 2.725], rtol=1e-6)


def test_default_config_is_diloco() -> None:
    cfg = OuterConfig()
    assert (cfg.lr, cfg.momentum, cfg.nesterov) == (0.7, 0.9, True)


@pytest.mark.parametrize("nesterov", [True, False])
def test_pure_python_path_matches_numpy(nesterov: bool) -> None:
    rng = np.random.default_rng(2)
    n = 257
    cfg = OuterConfig(lr=0.7, momentum=0.9, nesterov=nesterov)
    t_np = rng.standard_normal(n).astype(np.float32)
    m_np = np.zeros(n, dtype=np.float32)
    t_py, m_py = array("f", t_np.tolist()), array("f", m_np.tolist())
    for _ in range(5):
        g = (rng.standard_normal(n) * 0.1).astype(np.float32)
        t_np, m_np = outer_step(t_np, g, m_np, cfg)
        t_py, m_py = outer_step(t_py, array("f", g.tolist()), m_py, cfg)
        assert isinstance(t_py, array)
        assert t_py.typecode == "f"
        assert isinstance(m_py, array)
        assert m_py.typecode == "f"
        np.testing.assert_allclose(np.array(t_py), t_np, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.array(m_py), m_np, rtol=1e-6, atol=1e-6)


def test_pure_python_path_accepts_lists_for_grad_and_momentum() -> None:
    theta = array("f", [1.0, 2.0])
    new_t, new_m = outer_step(theta, [0.5, -1.0], [0.1, 0.2],
                              OuterConfig(lr=0.5, momentum=0.5))
    assert isinstance(new_t, array)
    assert list(new_m) == pytest.approx([0.55, -0.9], rel=1e-6)
    assert list(new_t) == pytest.approx([0.6125, 2.725], rel=1e-6)


def test_outer_step_does_not_modify_inputs() -> None:
    rng = np.random.default_rng(3)
    theta = rng.standard_normal(50).astype(np.float32)
    grad = rng.standard_normal(50).astype(np.float32)
    mom = rng.standard_normal(50).astype(np.float32)
    copies = theta.copy(), grad.copy(), mom.copy()
    new_t, new_m = outer_step(theta, grad, mom)
    for before, after in zip(copies, (theta, grad, mom), strict=True):
        np.testing.assert_array_equal(before, after)
    assert new_t is not theta
    assert new_m is not mom
    assert not np.shares_memory(new_t, theta)
    assert not np.shares_memory(new_m, mom)

    t_py, g_py, m_py = (array("f", v.tolist()) for v in copies)
    snap = [a.tobytes() for a in (t_py, g_py, m_py)]
    out_t, out_m = outer_step(t_py, g_py, m_py)
    assert [a.tobytes() for a in (t_py, g_py, m_py)] == snap
    assert out_t is not t_py
    assert out_m is not m_py


@pytest.mark.parametrize("lengths", [(3, 2, 3), (3, 3, 2), (2, 3, 3), (0, 1, 1)])
@pytest.mark.parametrize("kind", ["numpy", "array"])
def test_outer_step_length_mismatch(lengths: tuple[int, int, int], kind: str) -> None:
    def make(n: int) -> Vector:
        return np.zeros(n, dtype=np.float32) if kind == "numpy" else array("f", [0.0] * n)

    theta, grad, momentum = (make(n) for n in lengths)
    with pytest.raises(ValueError, match="length mismatch"):
        outer_step(theta, grad, momentum)


# -- aggregation -------------------------------------------------------------------------------
def test_mean_hand_case() -> None:
    ups = [np.array([1.0, -2.0, 3.0], dtype=np.float32),
           np.array([3.0, 2.0, 0.0], dtype=np.float32),
           np.array([2.0, 3.0, -6.0], dtype=np.float32)]
    out = mean(ups)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [2.0, 1.0, -1.0])
    py = mean([array("f", u.tolist()) for u in ups])
    assert isinstance(py, array)
    assert list(py) == [2.0, 1.0, -1.0]


def test_mean_single_update_is_itself() -> None:
    u = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    np.testing.assert_array_equal(mean([u]), u)


def test_mean_pure_matches_numpy() -> None:
    rng = np.random.default_rng(4)
    ups = [rng.standard_normal(300).astype(np.float32) for _ in range(5)]
    out_np = mean(ups)
    out_py = mean([array("f", u.tolist()) for u in ups])
    np.testing.assert_allclose(np.array(out_py), out_np, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out_np, np.mean(np.stack(ups), axis=0), rtol=1e-6, atol=1e-7)


def test_mean_refuses_empty_and_ragged() -> None:
    with pytest.raises(ValueError, match="no updates"):
        mean([])
    with pytest.raises(ValueError, match="length"):
        mean([np.zeros(3, dtype=np.float32), np.zeros(4, dtype=np.float32)])
    with pytest.raises(ValueError, match="length"):
        mean([array("f", [0.0] * 3), array("f", [0.0] * 2)])


def test_get_rule() -> None:
    assert get_rule("mean") is mean
    assert RULES["mean"] is mean
    with pytest.raises(ValueError, match="unknown aggregator 'krum-ish'") as info:
        get_rule("krum-ish")
    assert "mean" in str(info.value)  # lists the known rules


# -- vec ---------------------------------------------------------------------------------------
VALUES = [0.0, -0.0, 1.0, -2.5, 0.1, 3.4028234663852886e38, 1.401298464324817e-45]


@pytest.mark.parametrize("use_numpy", [True, False])
def test_from_bytes_is_little_endian(use_numpy: bool) -> None:
    data = b"".join(struct.pack("<f", x) for x in VALUES)
    v = from_bytes(data, use_numpy=use_numpy)
    assert isinstance(v, np.ndarray) is use_numpy
    assert [struct.pack("<f", x) for x in v] == [struct.pack("<f", x) for x in VALUES]
    assert to_bytes(v) == data
    # not the big-endian reading
    assert from_bytes(struct.pack("<f", 1.0), use_numpy=use_numpy)[0] == 1.0


def test_to_bytes_matches_struct() -> None:
    want = struct.pack(f"<{len(VALUES)}f", *VALUES)
    assert to_bytes(np.array(VALUES, dtype=np.float32)) == want
    assert to_bytes(np.array(VALUES, dtype=np.float64)) == want  # converted to float32
    assert to_bytes(array("f", VALUES)) == want
    assert to_bytes(np.array(VALUES, dtype=">f4")) == want  # byte order normalised


def test_from_bytes_copies_and_refuses_partial_values() -> None:
    buf = bytearray(struct.pack("<2f", 1.0, 2.0))
    v = from_bytes(buf)
    buf[0:4] = struct.pack("<f", 9.0)
    assert v[0] == 1.0
    assert v.flags.writeable
    with pytest.raises(ValueError, match="not a whole number of float32"):
        from_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="not a whole number of float32"):
        from_bytes(b"\x00" * 3, use_numpy=False)


def test_vec_helpers() -> None:
    a = np.array([3.0, 4.0], dtype=np.float32)
    p = array("f", [3.0, 4.0])
    assert l2_norm(a) == pytest.approx(5.0)
    assert l2_norm(p) == pytest.approx(5.0)
    assert all_finite(a)
    assert all_finite(p)
    assert not all_finite(np.array([1.0, math.nan], dtype=np.float32))
    assert not all_finite(array("f", [1.0, math.inf]))
    z = zeros_like(p)
    assert isinstance(z, array)
    assert list(z) == [0.0, 0.0]
    zn = zeros_like(a)
    assert zn.dtype == np.float32
    assert not zn.any()
    assert isinstance(same_kind(p, [1.0]), array)
    assert same_kind(a, [1.0]).dtype == np.float32


def test_worker_momentum_starts_at_the_first_delta_then_averages() -> None:
    d0 = np.array([1.0, -2.0, 4.0], dtype=np.float32)
    d1 = np.array([3.0, 2.0, 0.0], dtype=np.float32)
    assert worker_momentum(None, d0, 0.9) is d0  # no zero-start bias
    assert worker_momentum(d0, d1, 0.0) is d1  # beta 0: the raw delta
    m = worker_momentum(d0, d1, 0.75)
    np.testing.assert_allclose(m, [1.5, -1.0, 3.0])
    pure = worker_momentum(array("f", d0), array("f", d1), 0.75)
    assert isinstance(pure, array)
    assert list(pure) == [1.5, -1.0, 3.0]
    with pytest.raises(ValueError, match="beta"):
        worker_momentum(d0, d1, 1.0)


def test_history_reference_is_the_last_aggregate_without_outer_momentum() -> None:
    theta, g1, g2 = (np.zeros(3, np.float32), np.array([1, 2, 3], np.float32),
                     np.array([3, 2, 1], np.float32))
    for mu in (0.0, 0.9):
        cfg = OuterConfig(lr=0.5, momentum=mu)
        t, m = outer_step(theta, g1, np.zeros(3, np.float32), cfg)
        _, m = outer_step(t, g2, m, cfg)
        ref = history_reference(m, mu)
        want = g2 if mu == 0 else (1 - mu) * (mu * g1 + g2)  # EW mean of past aggregates
        np.testing.assert_allclose(ref, want, rtol=1e-6)
        assert list(history_reference(array("f", m), mu)) == pytest.approx(list(ref))
