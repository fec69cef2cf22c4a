"""SparseLoCo (shared.sparseloco): the 2-bit top-k values, the server's sparse outer step, the
"sparse" RoundOpen that nodes apply bit for bit, resync after a missed round, and a real
server with two native nodes whose download per round stays near their upload."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.common import run_swarm
from server.keys import RUN
from shared.codecs import TopK, decode_payload, make_codec
from shared.downlink import resolve
from shared.errors import BadUpdate
from shared.messages import Ack, RoundCommitted, RoundOpen, Welcome, sha256_hex
from shared.sparseloco import FEATURE, SparseOuter, decode_step, resolve_step, server_step
from shared.vec import to_bytes
from tests.test_ws_protocol import serve


def digest(x: np.ndarray) -> str:
    return sha256_hex(to_bytes(x))


@pytest.mark.parametrize(("n", "block"), [(1, 256), (5, 2), (1000, 7), (4099, 256)])
def test_int2_values_decode_the_same_on_both_paths(n: int, block: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    codec = make_codec("topk", fraction=0.3, values="int2", block=block)
    assert isinstance(codec, TopK)
    payload = codec.encode(x)
    assert payload == codec.encode([float(v) for v in x], use_numpy=False)
    a = np.asarray(decode_payload(payload, n), np.float32)
    b = np.asarray(decode_payload(payload, n, use_numpy=False), np.float32)
    assert a.tobytes() == b.tobytes()
    kept = a != 0
    assert kept.sum() == codec.k_for(n) or n < 4  # zeros kept as +-lo never happen here
    assert np.all(np.sign(a[kept]) == np.sign(x[kept]))  # the sign bit is exact
    # per block, at most two magnitudes
    mags = np.abs(a[kept])
    for s in range(0, mags.size, block):
        assert len(set(mags[s:s + block].tolist())) <= 2


def test_int2_payload_is_about_a_quarter_byte_per_value() -> None:
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    two = make_codec("topk", fraction=0.02, values="int2").encode(x)
    eight = make_codec("topk", fraction=0.02, values="int8").encode(x)
    assert len(two) < 0.7 * len(eight)
    assert len(two) < 2000 * (0.25 + 1.6) + 100  # values + varint gaps


@pytest.mark.parametrize("bad", [
    lambda p: p[:-1],  # truncated
    lambda p: p[:-1] + bytes([p[-1] | 0xC0]),  # pad bits set (k = 3: one byte, 1 pad code)
    lambda p: p[:12] + b"\xff\xff\xff\xff" + p[16:],  # a NaN level
])
def test_malformed_int2_payloads_are_typed_errors(bad: object) -> None:
    x = np.array([0.0, 3.0, 0.0, -1.0, 0.0, 0.5, 0, 0, 0, 0], np.float32)
    payload = make_codec("topk", fraction=0.3, values="int2").encode(x)
    for use_numpy in (True, False):
        with pytest.raises(BadUpdate):
            decode_payload(bad(payload), x.size, use_numpy=use_numpy)  # type: ignore[operator]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_nodes_reproduce_the_server_params_bit_for_bit(momentum: float) -> None:
    rng = np.random.default_rng(1)
    n = 20_000
    cfg = SparseOuter(lr=1.0, momentum=momentum, fraction=0.02)
    server = rng.standard_normal(n).astype(np.float32)
    node = server.copy()
    state = np.zeros(n, np.float32)
    moved = np.zeros(n, bool)
    for _ in range(8):
        grad = (rng.standard_normal(n) * 0.01).astype(np.float32)
        grad[rng.random(n) > 0.04] = 0.0  # a mean of sparse updates
        before = server
        server, state, payload = server_step(server, grad, state, cfg)
        assert state.size == (2 * n if momentum else n)
        changed = server != before
        moved |= changed
        assert changed.sum() <= cfg.codec().k_for(n)  # the step is sparse
        node = resolve_step(node, payload)
        assert node.tobytes() == server.tobytes()
        assert len(payload) < 0.03 * server.nbytes
    assert moved.sum() > cfg.codec().k_for(n)  # the residual brings other coordinates in
    lr, u = decode_step(payload, n)
    assert lr == 1.0
    assert u.dtype == np.float32


def test_error_feedback_keeps_what_the_step_dropped() -> None:
    n = 1000
    grad = np.linspace(-1, 1, n).astype(np.float32)
    theta = np.zeros(n, np.float32)
    cfg = SparseOuter(lr=1.0, fraction=0.05, values="fp16", decay=1.0)
    t1, e1, _ = server_step(theta, grad, np.zeros(n, np.float32), cfg)
    np.testing.assert_allclose(e1 + (theta - t1), grad, atol=1e-3)  # sent + kept = all
    e1 = e1.copy()  # server_step consumes its state buffer (updated in place)
    t2, e2, _ = server_step(t1, np.zeros(n, np.float32), e1.copy(), cfg)  # no new grad: the
    assert (t2 != t1).sum() == cfg.codec().k_for(n)  # residual alone moves the next step
    assert np.abs(e2).sum() < np.abs(e1).sum()


def test_decay_shrinks_only_the_server_residual() -> None:
    n = 1000
    grad = np.linspace(-1, 1, n).astype(np.float32)
    theta = np.zeros(n, np.float32)
    keep = SparseOuter(lr=1.0, fraction=0.05, values="fp16", decay=1.0)
    half = SparseOuter(lr=1.0, fraction=0.05, values="fp16", decay=0.5)
    t1, e1, p1 = server_step(theta, grad, np.zeros(n, np.float32), keep)
    t2, e2, p2 = server_step(theta, grad, np.zeros(n, np.float32), half)
    assert p1 == p2  # the step (what nodes apply) is the same
    assert t1.tobytes() == t2.tobytes()
    np.testing.assert_array_equal(e2, np.float32(0.5) * e1)
    assert SparseOuter().decay == 0.8  # the default: the best variant in bench.vs_ddp
    assert SparseOuter.from_params(1.0, {"decay": 0.5}).decay == 0.5
    with pytest.raises(ValueError, match="decay"):
        SparseOuter(decay=1.5)


def test_a_node_that_missed_a_round_is_refused_then_resyncs() -> None:
    rng = np.random.default_rng(2)
    n = 4000
    cfg = SparseOuter(fraction=0.02)
    theta0 = rng.standard_normal(n).astype(np.float32)
    theta1, st, p1 = server_step(theta0, rng.standard_normal(n).astype(np.float32),
                                 np.zeros(n, np.float32), cfg)
    theta2, _, p2 = server_step(theta1, rng.standard_normal(n).astype(np.float32), st, cfg)

    def open_(payload: bytes | None, base: str | None, params: np.ndarray) -> RoundOpen:
        return RoundOpen(run_id="r", round=2, attempt=0, params_digest=digest(params),
                         deadline_s=1.0, inner_steps=1, inner_lr=0.1, batch_size=1,
                         base_digest=base, payload=payload or to_bytes(params))

    sparse = open_(p2, digest(theta1), theta2)
    assert resolve(sparse, theta1, digest(theta1)).tobytes() == theta2.tobytes()
    with pytest.raises(BadUpdate, match="holds"):  # it holds theta0: missed round 1
        resolve(sparse, theta0, digest(theta0))
    with pytest.raises(BadUpdate, match="reproduce"):  # holds bytes that are not theta1
        resolve(sparse, theta1 + np.float32(1e-3), digest(theta1))
    # the participant drops its params and reconnects; the full params bring it back
    from shared.envelope import Identity
    from shared.participant import Participant

    part = Participant(Identity.generate(), runtime="native", agent="t", device="cpu")
    part.held, part.held_digest = theta0, digest(theta0)
    events = part._on_round_open(sparse)
    assert [e["kind"] for e in events] == ["reconnect"]
    assert part.held is None
    part._on_round_open(open_(None, None, theta2))
    assert part.held_digest == digest(theta2)
    assert p1 != p2


def test_config_checks_the_sparse_outer() -> None:
    from server.config import RunConfig

    RunConfig(outer="sparseloco", outer_params={"fraction": 0.03, "momentum": 0.9})
    for bad in ({"fraction": 0.0}, {"values": "int3"}, {"density": 0.1}, {"momentum": 1.0}):
        with pytest.raises(ValueError, match="outer_params"):
            RunConfig(outer="sparseloco", outer_params=bad)
    with pytest.raises(ValueError, match="p2p"):
        RunConfig(outer="sparseloco", transport="p2p")


async def test_server_broadcasts_the_sparse_step_and_the_client_holds_its_bytes(
        tmp_path: Path) -> None:
    async with serve(tmp_path, quorum=1, deadline_s=60.0, outer="sparseloco",
                     outer_params={"fraction": 0.02}) as srv:
        run = srv.app[RUN]
        a = await srv.client("a", hello=False)
        await a.send(a.hello(features=f"delta-params,{FEATURE}"))
        a.welcome = await a.expect(Welcome)
        a.open = await a.expect(RoundOpen)
        b = await srv.client("b", hello=False)  # a tab: no sparse-step, float32 changes
        await b.send(b.hello(features="delta-params"))
        b.welcome = await b.expect(Welcome)
        b.open = await b.expect(RoundOpen)
        assert a.open.base_digest is None
        assert b.open is not None
        held_a = held_b = np.frombuffer(a.open.payload, "<f4").astype(np.float32)
        da = db = a.open.params_digest
        rng = np.random.default_rng(3)
        for _ in range(3):
            vec = (rng.standard_normal(a.n_params) * 0.01).astype(np.float32)
            await a.send(a.submit(vec))
            await b.send(b.submit(-0.5 * vec))
            assert (await a.expect(Ack)).status == "accepted"
            assert (await b.expect(Ack)).status == "accepted"
            await a.expect(RoundCommitted)
            await b.expect(RoundCommitted)
            a.open, b.open = await a.expect(RoundOpen), await b.expect(RoundOpen)
            assert a.open.base_digest == da
            assert b.open.base_digest == db
            assert len(a.open.payload) < len(b.open.payload) < 0.2 * held_a.nbytes
            held_a = resolve(a.open, held_a, da)
            held_b = resolve(b.open, held_b, db)
            da, db = a.open.params_digest, b.open.params_digest
            assert held_a.tobytes() == held_b.tobytes() == run.params.tobytes()
        assert run.sparse_step is not None


def test_real_server_and_two_native_nodes_stay_in_step(tmp_path: Path) -> None:
    """Nodes that diverged would reconnect and download the full params: every round after
    the first downloads no more than twice what it uploads."""
    rounds = 4
    out = run_swarm(tmp_path, nodes=2, rounds=rounds, timeout=120, server_flags=[
        "--model", "gpt-tiny", "--flavour", "nano", "--inner-steps", "3", "--batch-size", "8",
        "--codec", "topk", "--codec-params", '{"fraction": 0.02, "values": "int2"}',
        "--outer", "sparseloco", "--outer-lr", "1.0",
        "--outer-params", '{"fraction": 0.02}'])
    rows = sorted(out["rounds"], key=lambda r: r["round"])
    assert len(rows) == rounds
    n = out["run"]["n_params"]
    assert rows[0]["bytes_down"] > 4 * n * 2  # round 0: the full params to both nodes
    for r in rows[1:]:
        assert r["bytes_down"] <= 2 * r["bytes_up"], r
        assert r["bytes_down"] < 0.1 * 4 * n * 2
    losses = [r["eval_loss"] for r in rows]
    assert losses[-1] < out["run"]["eval_loss_init"]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_restarted_server_resumes_its_residual(tmp_path: Path, momentum: float) -> None:
    from server.outer_step import commit_step
    from server.runstate import open_run

    cfg = {"model": "mlp-digits", "outer": "sparseloco", "outer_lr": 1.0,
           "outer_params": {"fraction": 0.02, "momentum": momentum}}
    run = open_run(tmp_path / "run", cfg)
    grad = np.random.default_rng(5).standard_normal(run.n_params).astype(np.float32)
    theta, state, step = commit_step(run.config, run.params, grad, run.momentum)
    assert step is not None
    assert state.size == (2 if momentum else 1) * run.n_params
    run.commit(round_=0, params=theta, momentum=state, attempts=1, eval_loss=None,
               train_loss=None, updates=[], bytes_up=0, bytes_down=0, duration_s=0.1,
               sparse_step=step)
    assert run.sparse_step == step
    run.store.close()
    again = open_run(tmp_path / "run", {})
    assert again.params.tobytes() == theta.tobytes()
    assert again.momentum.tobytes() == state.tobytes()  # e (and m) survive the restart
    assert again.sparse_step is None  # nodes get the full params after a restart
    again.store.close()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_random_step_payloads_only_raise_bad_update(blob: bytes) -> None:
    held = np.zeros(16, np.float32)
    for payload in (b"DL\x03" + struct.pack("<d", 1.0) + blob, b"DL\x03" + blob):
        try:
            out = resolve_step(held, payload)
        except BadUpdate:
            continue
        assert out.shape == (16,)
