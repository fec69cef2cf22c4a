"""The in-place, sparse SparseLoCo step (shared.sparseloco) against the dense formulas it
replaced: the same bits for theta', the state and the payload, plain and Nesterov, across
chunk edges, and the same bits as the dense apply on -0.0, infinities and NaNs."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest

from shared import sparseloco
from shared.codecs import TopK, decode_payload, make_codec
from shared.sparseloco import (
    SparseOuter,
    apply_sparse,
    apply_step,
    decode_sparse_step,
    decode_step,
    resolve_step,
    server_step,
)


def dense_server_step(theta: np.ndarray, grad: np.ndarray, state: np.ndarray,
                      cfg: SparseOuter) -> tuple[np.ndarray, np.ndarray, bytes]:
    """The step as it was written before it went in place (every temporary n-sized)."""
    n = theta.size
    g = np.asarray(grad, dtype=np.float32)
    st = np.asarray(state, dtype=np.float32)
    if cfg.momentum > 0:
        if st.size == n:
            st = np.concatenate([np.zeros(n, np.float32), st])
        m = (np.float32(cfg.momentum) * st[:n] + g).astype(np.float32)
        x = (g + np.float32(cfg.momentum) * m + st[n:]).astype(np.float32)
    else:
        m = None
        x = (g + st[-n:]).astype(np.float32)
    payload = sparseloco.HEAD.pack(sparseloco.MAGIC, sparseloco.VERSION, cfg.lr) + \
        cfg.codec().encode(x)
    u = decode_step(payload, n)[1]
    e = (x - u).astype(np.float32)
    if cfg.decay != 1.0:
        e = (e * np.float32(cfg.decay)).astype(np.float32)
    new_state = e if m is None else np.concatenate([m, e])
    return apply_step(theta, u, cfg.lr), new_state, payload


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize(("values", "decay", "lr"), [("int2", 0.8, 1.0), ("int8", 1.0, 0.7),
                                                     ("fp16", 0.5, 0.35)])
def test_in_place_step_gives_the_dense_steps_bits(monkeypatch: pytest.MonkeyPatch,
                                                  momentum: float, values: str, decay: float,
                                                  lr: float) -> None:
    monkeypatch.setattr(sparseloco, "CHUNK", 997)  # many chunks, edges inside the vector
    rng = np.random.default_rng(int(momentum * 10) + len(values))
    n = 10_007
    cfg = SparseOuter(lr=lr, momentum=momentum, fraction=0.03, values=values, decay=decay,
                      block=64)
    theta = rng.standard_normal(n).astype(np.float32)
    theta[:50] = -0.0
    state_ref = np.zeros(n, np.float32)  # the first step: a size-n state (m = 0)
    state = state_ref.copy()
    for _ in range(5):
        grad = (rng.standard_normal(n) * 0.01).astype(np.float32)
        grad[rng.random(n) > 0.3] = 0.0
        grad[rng.integers(0, n, 20)] = -0.0
        t_ref, state_ref, p_ref = dense_server_step(theta, grad, state_ref, cfg)
        passed = state
        t_new, state, p_new = server_step(theta, grad, state, cfg)
        assert p_new == p_ref
        assert t_new.tobytes() == t_ref.tobytes()
        assert state.tobytes() == state_ref.tobytes()
        if passed.size == state.size:
            assert np.shares_memory(state, passed)  # consumed in place, no copy
        theta = t_ref


def test_a_read_only_or_plain_sized_state_is_copied_not_written() -> None:
    rng = np.random.default_rng(7)
    n = 3000
    theta = rng.standard_normal(n).astype(np.float32)
    grad = rng.standard_normal(n).astype(np.float32)
    e = rng.standard_normal(n).astype(np.float32)
    ro = np.frombuffer(e.tobytes(), np.float32)  # as a checkpoint's bytes would be
    for cfg in (SparseOuter(fraction=0.05), SparseOuter(fraction=0.05, momentum=0.5)):
        t_ref, s_ref, _ = dense_server_step(theta, grad, e, cfg)
        t_new, s_new, _ = server_step(theta, grad, ro, cfg)
        assert t_new.tobytes() == t_ref.tobytes()
        assert s_new.tobytes() == s_ref.tobytes()
        assert ro.tobytes() == e.tobytes()
    me = np.concatenate([rng.standard_normal(n).astype(np.float32), e])
    me_ro = np.frombuffer(me.tobytes(), np.float32)
    nesterov = SparseOuter(fraction=0.05, momentum=0.5)
    t_ref, s_ref, _ = dense_server_step(theta, grad, me, nesterov)
    t_new, s_new, _ = server_step(theta, grad, me_ro, nesterov)
    assert t_new.tobytes() == t_ref.tobytes()
    assert s_new.tobytes() == s_ref.tobytes()
    assert me_ro.tobytes() == me.tobytes()
    # [m, e] into a plain step: the residual carries over, m is dropped (as before)
    me = np.concatenate([rng.standard_normal(n).astype(np.float32), e])
    t_ref, s_ref, _ = dense_server_step(theta, grad, me, SparseOuter(fraction=0.05))
    t_new, s_new, _ = server_step(theta, grad, me.copy(), SparseOuter(fraction=0.05))
    assert s_new.size == n
    assert s_new.tobytes() == s_ref.tobytes()
    assert t_new.tobytes() == t_ref.tobytes()


def test_sparse_apply_matches_the_dense_apply_on_edge_values() -> None:
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45,
                         3.4e38, -3.4e38], np.float32)
    rng = np.random.default_rng(11)
    theta = np.concatenate([specials, rng.standard_normal(990).astype(np.float32)])
    n = theta.size
    idx = np.sort(rng.choice(np.arange(5, n), 60, replace=False)).astype(np.int64)
    idx = np.unique(np.concatenate([idx, [1, 2, 4]]))  # moved: -0.0, inf, nan
    vals = rng.standard_normal(idx.size).astype(np.float32)
    vals[:3] = [0.0, -0.0, 2.0]
    vals[5] = np.float32(3.4e38)  # overflow to inf after lr: the same on both paths
    for lr in (1.0, 0.3, 7.5):
        u = np.zeros(n, np.float32)
        u[idx] = vals
        with np.errstate(over="ignore"):
            dense = apply_step(theta, u, lr)
            sparse = apply_sparse(theta, idx, vals, lr)
            out = theta.copy()
            assert apply_sparse(theta, idx, vals, lr, out=out) is out
        assert sparse.tobytes() == dense.tobytes()
        assert out.tobytes() == dense.tobytes()


@pytest.mark.parametrize("values", ["int2", "int8", "fp16"])
def test_sparse_decode_is_the_dense_decode(values: str) -> None:
    x = np.random.default_rng(3).standard_normal(5000).astype(np.float32)
    payload = make_codec("topk", fraction=0.04, values=values, block=32).encode(x)
    idx, vals = TopK.decode_sparse(payload, x.size)
    assert idx.dtype == np.int64
    assert vals.dtype == np.float32
    assert np.all(np.diff(idx) > 0)
    dense = np.zeros(x.size, np.float32)
    dense[idx] = vals
    assert dense.tobytes() == np.asarray(decode_payload(payload, x.size), np.float32).tobytes()


def test_resolve_step_in_place_leaves_held_alone_on_a_bad_payload() -> None:
    rng = np.random.default_rng(5)
    n = 2000
    theta = rng.standard_normal(n).astype(np.float32)
    new, _, payload = server_step(theta, rng.standard_normal(n).astype(np.float32),
                                  np.zeros(n, np.float32), SparseOuter(fraction=0.05))
    held = theta.copy()
    assert resolve_step(held, payload, out=held) is held
    assert held.tobytes() == new.tobytes()
    lr, idx, vals = decode_sparse_step(payload, n)
    assert lr == 1.0
    assert idx.size == vals.size == SparseOuter(fraction=0.05).codec().k_for(n)
    held = theta.copy()
    from shared.errors import BadUpdate

    with pytest.raises(BadUpdate):
        resolve_step(held, payload[:-1], out=held)
    assert held.tobytes() == theta.tobytes()


@pytest.mark.parametrize("block", [1, 3, 256])
def test_chunked_int2_and_varint_passes_give_one_pass_bytes(monkeypatch: pytest.MonkeyPatch,
                                                            block: int) -> None:
    from shared.codecs import int2, varint

    x = np.random.default_rng(block).standard_normal(20_011).astype(np.float32)
    codec = make_codec("topk", fraction=0.6, values="int2", block=block)
    whole = codec.encode(x)
    dense = np.asarray(decode_payload(whole, x.size), np.float32)
    monkeypatch.setattr(varint, "CHUNK", 37)
    monkeypatch.setattr(int2, "chunk", lambda b: 4 * b * 3)
    assert codec.encode(x) == whole
    assert np.asarray(decode_payload(whole, x.size), np.float32).tobytes() == dense.tobytes()
    gaps = np.diff(np.flatnonzero(x > 0), prepend=0)
    data = varint.encode_np(np, gaps)
    assert data == varint.encode_pure(int(g) for g in gaps)
    assert varint.decode_np(np, data, gaps.size).tolist() == gaps.tolist()
    from shared.errors import BadUpdate

    for bad, count in ((data[:-1] + b"\x80", gaps.size), (data, gaps.size + 1),
                       (data, gaps.size - 1), (b"\x80" * 50 + b"\x01", 1),
                       (data[:40] + b"\x80\x00" + data[40:], gaps.size + 1)):
        with pytest.raises(BadUpdate):
            varint.decode_np(np, bad, count)


def test_the_commit_lets_go_of_the_aggregate_and_keeps_theta_once(tmp_path: Path) -> None:
    """server.outer_step drops a handed-over aggregate before theta' exists, builds theta' in
    the bytes RunState then keeps for RoundOpen (no copy), and updates the residual in place:
    the server's memory at a 125M commit (bench.scale_server)."""
    from server.outer_step import commit_step
    from server.runstate import open_run

    run = open_run(tmp_path / "run", {"model": "mlp-digits", "outer": "sparseloco",
                                      "outer_lr": 1.0, "outer_params": {"fraction": 0.05}})
    try:
        grad = np.random.default_rng(9).standard_normal(run.n_params).astype(np.float32)
        ref_theta, ref_state, ref_step = server_step(
            run.params, grad, run.momentum.copy(), SparseOuter.from_params(
                1.0, {"fraction": 0.05}))
        gone = weakref.ref(grad)
        handed, momentum = [grad], run.momentum
        del grad
        theta, state, step = commit_step(run.config, run.params, handed, momentum)
        assert handed == []
        assert gone() is None  # the aggregate was freed by the step
        assert state is momentum or np.shares_memory(state, momentum)  # e in place
        assert theta.tobytes() == ref_theta.tobytes()
        assert state.tobytes() == ref_state.tobytes()
        assert step == ref_step
        assert isinstance(theta.base, bytes)
        run.commit(round_=0, params=theta, momentum=state, attempts=1, eval_loss=None,
                   train_loss=None, updates=[], bytes_up=0, bytes_down=0, duration_s=0.1,
                   sparse_step=step)
        assert run.params_bytes is theta.base  # RoundOpen's bytes are theta' itself
        assert np.shares_memory(run.params, theta)
    finally:
        run.store.close()
