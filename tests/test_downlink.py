"""Compressed RoundOpen payloads (shared.downlink): exact round trips, typed errors on bad
payloads, and a real server sending only the changed coordinates to a node that holds the
previous params."""

from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.downlink import apply_changes, encode_changes, resolve
from shared.errors import BadUpdate
from shared.messages import Ack, RoundCommitted, RoundOpen, Welcome, sha256_hex
from tests.test_ws_protocol import serve


def test_round_trip_is_bit_exact_including_signed_zeros() -> None:
    rng = np.random.default_rng(0)
    prev = rng.standard_normal(1000).astype(np.float32)
    new = prev.copy()
    idx = rng.choice(1000, 40, replace=False)
    new[idx] += rng.standard_normal(40).astype(np.float32)
    new[5] = -0.0 if prev[5] == 0.0 else new[5]
    prev[7], new[7] = 0.0, -0.0  # a sign change of zero is a change
    payload = encode_changes(prev, new)
    assert payload is not None
    assert len(payload) < 0.25 * new.nbytes
    out = apply_changes(prev, payload)
    assert out.tobytes() == new.tobytes()
    pure = apply_changes(array("f", prev), payload)
    assert array("f", pure).tobytes() == new.tobytes()


def test_changes_found_block_by_block_are_the_whole_vector_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import shared.downlink as dl

    rng = np.random.default_rng(7)
    prev = rng.standard_normal(10_007).astype(np.float32)
    new = prev.copy()
    moved = rng.choice(prev.size, 300, replace=False)
    new[moved] += np.float32(0.5)
    new[[0, 1023, 1024, 10_006]] = -new[[0, 1023, 1024, 10_006]]  # block edges move too
    whole = encode_changes(prev, new)
    monkeypatch.setattr(dl, "CMP_BLOCK", 1024)
    blocks = encode_changes(prev, new)
    assert blocks == whole
    assert blocks is not None
    assert apply_changes(prev, blocks).tobytes() == new.tobytes()


def test_dense_changes_are_not_worth_a_delta() -> None:
    prev = np.zeros(10, np.float32)
    assert encode_changes(prev, prev + 1) is None
    assert encode_changes(prev, prev) is not None  # nothing changed: 11 bytes


@pytest.mark.parametrize("payload", [b"", b"XX\x01" + bytes(8), b"DL\x02" + bytes(8),
                                     b"DL\x01" + (5).to_bytes(4, "little") + bytes(4)])
def test_malformed_payloads_are_typed_errors(payload: bytes) -> None:
    with pytest.raises(BadUpdate):
        apply_changes(np.zeros(4, np.float32), payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_payloads_only_raise_bad_update(blob: bytes) -> None:
    for prev in (np.zeros(8, np.float32), array("f", [0.0] * 8)):
        try:
            out = apply_changes(prev, b"DL\x01" + (8).to_bytes(4, "little") + blob)
        except BadUpdate:
            continue
        assert len(out) == 8


def test_resolve_checks_base_and_result() -> None:
    prev = np.arange(8, dtype=np.float32)
    new = prev.copy()
    new[3] = 9.5
    digest = sha256_hex(new.astype("<f4").tobytes())
    base = sha256_hex(prev.astype("<f4").tobytes())
    changes = encode_changes(prev, new)
    assert changes is not None  # one coordinate of eight changed
    msg = RoundOpen(run_id="r", round=1, attempt=0, params_digest=digest, deadline_s=1.0,
                    inner_steps=1, inner_lr=0.1, batch_size=1, base_digest=base,
                    payload=changes)
    assert resolve(msg, prev, base).tobytes() == new.tobytes()
    with pytest.raises(BadUpdate, match="holds"):
        resolve(msg, prev, "00" * 32)
    with pytest.raises(BadUpdate, match="reproduce"):
        resolve(msg, prev + 1, base)


async def test_server_sends_changes_to_a_node_that_holds_the_previous_params(
        tmp_path: Path) -> None:
    async with serve(tmp_path, quorum=1, deadline_s=60.0) as srv:
        a = await srv.client("a", hello=False)
        await a.send(a.hello(features="delta-params"))
        a.welcome = await a.expect(Welcome)
        a.open = await a.expect(RoundOpen)
        assert a.open.base_digest is None  # first contact: the full params
        theta0 = np.frombuffer(a.open.payload, "<f4").astype(np.float32)
        sparse = np.zeros(a.welcome.n_params, np.float32)
        sparse[::100] = 0.5  # 1% of the coordinates move (outer lr 1, no momentum)
        await a.send(a.submit(sparse))
        assert (await a.expect(Ack)).status == "accepted"
        await a.expect(RoundCommitted)
        nxt = await a.expect(RoundOpen)
        assert nxt.base_digest == a.open.params_digest
        assert len(nxt.payload) < 0.1 * theta0.nbytes
        theta1 = resolve(nxt, theta0, a.open.params_digest)
        np.testing.assert_array_equal(theta1, theta0 - sparse)
        b = await srv.client("b")  # no feature announced: always the full params
        assert b.open is not None
        assert b.open.base_digest is None
        assert b.open.params_digest == nxt.params_digest


def test_p2p_outer_step_is_recomputed_by_the_node_and_checked() -> None:
    from shared.downlink import apply_outer_step, encode_outer_step, is_outer_step
    from shared.outer import OuterConfig, outer_step

    rng = np.random.default_rng(4)
    theta, m, agg = (rng.standard_normal(50).astype(np.float32) for _ in range(3))
    want, want_m = outer_step(theta, agg, m, OuterConfig(lr=0.7, momentum=0.9))
    payload = encode_outer_step(0.7, 0.9)
    assert is_outer_step(payload)
    assert not is_outer_step(payload + b"\0")
    digest = sha256_hex(np.asarray(want).tobytes())
    got, got_m = apply_outer_step(theta, m, agg, payload, digest)
    assert np.array_equal(got, want)
    assert np.array_equal(got_m, want_m)  # bit for bit
    with pytest.raises(BadUpdate, match="does not match"):
        apply_outer_step(theta, m, agg + np.float32(1e-3), payload, digest)  # other aggregate
    with pytest.raises(BadUpdate, match="lacks"):
        apply_outer_step(theta, None, agg, payload, digest)  # never got the momentum


def test_params_with_momentum_resolve_to_the_params_half() -> None:
    theta = np.arange(6, dtype=np.float32)
    mom = -theta
    msg = RoundOpen(run_id="r", round=1, attempt=0, params_digest=sha256_hex(theta.tobytes()),
                    deadline_s=5.0, inner_steps=1, inner_lr=0.1, batch_size=2,
                    with_momentum=True, payload=theta.tobytes() + mom.tobytes())
    assert np.array_equal(resolve(msg, None, None), theta)
