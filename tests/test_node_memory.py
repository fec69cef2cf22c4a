"""A native node's memory at large models: the copies of the model it does not make.

The trainer's base θ_r is the participant's own array (shared, never written); error
feedback writes the new residual into the one it gives up, and takes back only what a topk
payload kept (indices + values); the RoundOpen digest is taken over a view. Each gives the
same bits as the copying formula it replaces.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.codecs import make_codec
from shared.codecs.base import with_error_feedback
from shared.update_encoding import encode_update
from shared.vec import byte_view, to_bytes


def _vec(n: int, seed: int, scale: float = 1.0) -> np.ndarray:
    v = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    v[::97] = -0.0  # signed zeros must survive the residual's arithmetic
    return v


@pytest.mark.parametrize("values", ["int2", "int8", "fp16"])
def test_topk_error_feedback_sparse_and_in_place_is_the_dense_formula(values: str) -> None:
    codec = make_codec("topk", fraction=0.05, values=values)
    n = 50_000
    delta = _vec(n, 1)
    delta.flags.writeable = False  # the trainer's Δ, read in place
    residual = _vec(n, 2, 0.1)
    x = delta + residual
    want_payload = codec.encode(x)
    want = x - codec.decode(want_payload, n)
    kept = residual.copy()
    payload, lost = with_error_feedback(codec, delta, kept)  # pure: nothing written
    assert payload == want_payload
    assert lost.tobytes() == want.tobytes()
    assert kept.tobytes() == residual.tobytes()
    payload, lost = with_error_feedback(codec, delta, kept, consume=True)
    assert lost is kept  # the residual given up became the new one
    assert payload == want_payload
    assert lost.tobytes() == want.tobytes()
    # the first round (no residual): a new array, Δ untouched
    before = delta.tobytes()
    payload, lost = with_error_feedback(codec, delta, None, consume=True)
    first = delta - codec.decode(payload, n)
    assert lost.tobytes() == first.tobytes()
    assert delta.tobytes() == before


def test_encode_update_consumes_only_when_asked() -> None:
    codec = make_codec("topk", fraction=0.01, values="int2")
    delta, residual = _vec(10_000, 3), _vec(10_000, 4, 0.1)
    keep = residual.copy()
    p1, r1, _ = encode_update(codec, delta, residual=residual, state=None,
                              error_feedback=True, layout=None)
    assert residual.tobytes() == keep.tobytes()
    assert r1 is not None
    assert r1 is not residual
    p2, r2, _ = encode_update(codec, delta, residual=residual, state=None,
                              error_feedback=True, layout=None, consume=True)
    assert r2 is residual
    assert p1 == p2
    assert r1.tobytes() == r2.tobytes()
    ro = keep.copy()
    ro.flags.writeable = False  # not ours to write: encoded from a new x
    _, r3, _ = encode_update(codec, delta, residual=ro, state=None, error_feedback=True,
                             layout=None, consume=True)
    assert r3 is not None
    assert r3 is not ro
    assert r3.tobytes() == r1.tobytes()


def test_byte_view_is_the_bytes_without_a_copy() -> None:
    v = _vec(1000, 5)
    view = byte_view(v)
    assert bytes(view) == to_bytes(v)
    assert isinstance(view, memoryview)
    assert view.readonly
    assert np.shares_memory(np.frombuffer(view, dtype=np.float32), v)
    strided = v[::2]
    assert bytes(byte_view(strided)) == to_bytes(strided)  # not contiguous: a copy


def test_trainer_base_is_the_callers_array_and_never_written() -> None:
    from ml.zoo import build_model, flatten, model_config
    from native_node.trainer import DeviceParams

    model = build_model(model_config("mlp-digits", seed=1))
    params = DeviceParams(model, torch.device("cpu"))
    assert params.theta.numel() == 0  # no buffer of its own until one is needed
    theta = _vec(params.n, 6, 0.1)
    theta.flags.writeable = False  # e.g. the participant's held array, or a frame's view
    params.set_theta(theta)
    assert params.shared
    assert np.shares_memory(params.theta.numpy(), theta)
    params.to_model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    assert np.array_equal(params.delta(), theta - flatten(model))
    kept = theta.tobytes()
    params.hold_current()  # steps run ahead: a buffer of its own, the caller's left alone
    assert not params.shared
    assert not np.shares_memory(params.theta.numpy(), theta)
    assert np.array_equal(params.theta.numpy(), flatten(model))
    params.set_theta(theta)
    params.merge(_vec(params.n, 7, 0.1))  # overlap: the merge writes its own buffer
    assert theta.tobytes() == kept
    assert not params.shared
    params.set_theta(theta)
    params.release()
    assert params.theta.numel() == 0
    assert not params.shared
    with pytest.raises(ValueError, match="values for a model of"):
        params.set_theta(theta[:-1])


def test_a_round_lets_the_shared_base_go() -> None:
    from ml.workload import resolve
    from native_node.trainer import Trainer

    work = resolve(model="llama", flavour="tiny", data=None, data_path=None,
                   partition="iid", alpha=1.0, seed=0)
    trainer = Trainer(work, shard=0, n_shards=1, node_id="n")
    theta = np.concatenate([p.detach().reshape(-1).numpy() for p in trainer.model.parameters()])
    kept = theta.copy()
    out = trainer.train_round(theta, steps=2, lr=1e-3, batch_size=2)
    assert trainer.params.theta.numel() == 0  # no reference to the participant's array
    assert theta.tobytes() == kept.tobytes()
    from ml.zoo import flatten

    assert out.delta.tobytes() == (kept - flatten(trainer.model)).tobytes()
