"""Tests for ml.zoo: configs, init, loss, flat vectors, causality, training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ml.data import BatchSampler, DataSpec, load_dataset
from ml.zoo import (
    MODELS,
    build_model,
    evaluate,
    flatten,
    load_flat,
    loss_fn,
    manifest,
    model_config,
    param_count,
)


def test_model_config_contents_and_errors() -> None:
    cfg = model_config("gpt-tiny", vocab_size=32, seed=3)
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["name"] == "gpt-tiny"
    assert cfg["flavour"] == "nano"
    assert cfg["seed"] == 3
    assert (cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["context"]) == (64, 2, 4, 64)
    assert cfg["mlp_ratio"] == 4
    assert cfg["vocab_size"] == 32
    assert model_config("gpt-tiny", "micro", vocab_size=32, context=32)["context"] == 32
    assert model_config("mlp-digits", "wide")["hidden"] == 256
    assert set(MODELS) == {"gpt-tiny", "llama", "mlp-digits"}
    with pytest.raises(ValueError, match="name"):
        model_config("resnet")
    with pytest.raises(ValueError, match="flavour"):
        model_config("gpt-tiny", "huge", vocab_size=32)
    with pytest.raises(ValueError, match="vocab_size"):
        model_config("gpt-tiny")
    with pytest.raises(ValueError, match="context"):
        model_config("gpt-tiny", vocab_size=32, context=0)
    with pytest.raises(ValueError, match="name"):
        build_model({"name": "nope"})


@pytest.mark.parametrize(
    ("flavour", "low", "high"), [("nano", 90_000, 120_000), ("micro", 700_000, 900_000)]
)
def test_gpt_param_counts(flavour: str, low: int, high: int) -> None:
    model = build_model(model_config("gpt-tiny", flavour, vocab_size=32))
    assert low <= param_count(model) <= high
    assert model.task == "lm"


def test_mlp_shapes_and_counts() -> None:
    model = build_model(model_config("mlp-digits"))
    assert param_count(model) == 64 * 128 + 128 + 128 * 10 + 10
    assert model.task == "classify"
    assert model(torch.zeros(3, 64)).shape == (3, 10)


def test_deterministic_init_without_global_seed() -> None:
    cfg = model_config("gpt-tiny", vocab_size=16, context=8, seed=7)
    torch.manual_seed(123)
    a = flatten(build_model(cfg))
    torch.manual_seed(456)
    b = flatten(build_model(cfg))
    assert np.array_equal(a, b)
    c = flatten(build_model({**cfg, "seed": 8}))
    assert not np.array_equal(a, c)


def test_no_linear_modules() -> None:
    model = build_model(model_config("gpt-tiny", vocab_size=16))
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())


def test_loss_fn_matches_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 11, generator=gen)
    y = torch.randint(0, 11, (3, 5), generator=gen)
    assert torch.allclose(loss_fn(z, y), F.cross_entropy(z.reshape(-1, 11), y.reshape(-1)))
    z2 = torch.randn(7, 10, generator=gen)
    y2 = torch.randint(0, 10, (7,), generator=gen)
    assert torch.allclose(loss_fn(z2, y2), F.cross_entropy(z2, y2))


def test_flatten_round_trip_and_manifest() -> None:
    model = build_model(model_config("gpt-tiny", vocab_size=16, context=8))
    vec = flatten(model)
    assert vec.dtype == np.dtype("<f4")
    assert vec.ndim == 1
    assert vec.flags.c_contiguous
    assert vec.shape == (param_count(model),)
    man = manifest(model)
    params = dict(model.named_parameters())
    assert [m[0] for m in man] == list(params)
    offset = 0
    for name, shape, off, length in man:
        assert off == offset
        assert length == math.prod(shape)
        assert np.array_equal(vec[off : off + length].reshape(shape), params[name].detach())
        offset += length
    assert offset == len(vec)
    new = np.arange(len(vec), dtype=np.float32) * 1e-4
    load_flat(model, new)
    assert np.array_equal(flatten(model), new)
    with pytest.raises(ValueError, match="length"):
        load_flat(model, new[:-1])


def test_causal_and_shapes() -> None:
    model = build_model(model_config("gpt-tiny", vocab_size=16, context=12)).eval()
    x = torch.randint(0, 16, (2, 10), generator=torch.Generator().manual_seed(1))
    x2 = x.clone()
    x2[:, 6] = (x2[:, 6] + 1) % 16
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert a.shape == (2, 10, 16)
    assert a.dtype == torch.float32
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-4)
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 13, dtype=torch.int64))


def test_adamw_reduces_markov_loss() -> None:
    ds = load_dataset(DataSpec(kind="markov", vocab_size=16, context=16, n_train=2048, n_val=128))
    model = build_model(model_config("gpt-tiny", vocab_size=16, context=16, seed=0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sampler = BatchSampler(ds.x_train, ds.y_train, batch_size=32, seed=0)
    before = evaluate(model, ds.x_val, ds.y_val)
    assert before == pytest.approx(math.log(16), abs=0.2)
    losses = []
    for _ in range(40):
        xb, yb = sampler.sample()
        opt.zero_grad()
        loss = loss_fn(model(torch.from_numpy(xb)), torch.from_numpy(yb))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = evaluate(model, ds.x_val, ds.y_val)
    assert np.mean(losses[-5:]) < losses[0] - 0.1
    assert after < before - 0.1
    assert ds.entropy_floor is not None
    assert after > ds.entropy_floor


def test_evaluate_matches_full_batch_and_restores_mode() -> None:
    ds = load_dataset(DataSpec(kind="digits"))
    model = build_model(model_config("mlp-digits")).train()
    got = evaluate(model, ds.x_val, ds.y_val, batch_size=37)
    with torch.no_grad():
        full = float(loss_fn(model(torch.from_numpy(ds.x_val)), torch.from_numpy(ds.y_val)))
    assert got == pytest.approx(full, rel=1e-5)
    assert model.training


def test_traces_under_make_fx_grad_and_value() -> None:
    from torch.func import functional_call, grad_and_value
    from torch.fx.experimental.proxy_tensor import make_fx

    model = build_model(model_config("gpt-tiny", vocab_size=8, context=8))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def step(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> object:
        return grad_and_value(lambda q: loss_fn(functional_call(model, q, (x,)), y))(p)

    x = torch.randint(0, 8, (2, 8))
    gm = make_fx(step)(params, x, torch.roll(x, -1, 1))
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    banned = ("scaled_dot_product", "nll_loss", "one_hot", "nonzero", "linear")
    assert not [op for op in ops if any(b in op for b in banned)]
