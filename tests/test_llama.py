"""Tests for ml.llama: sizes, the Llama building blocks against torch's own, causality,
rotary position (attention depends on relative position only), and that it learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ml.data import BatchSampler, DataSpec, load_dataset
from ml.llama import LLAMA_FLAVOURS, apply_rope, llama_param_count, rms_norm, rope_tables
from ml.zoo import build_model, flatten, load_flat, loss_fn, model_config, param_count


@pytest.mark.parametrize(
    ("flavour", "low", "high"),
    [("2m", 1_500_000, 2_500_000), ("20m", 17_000_000, 23_000_000),
     ("125m", 110_000_000, 130_000_000)],
)
def test_flavour_sizes(flavour: str, low: int, high: int) -> None:
    cfg = model_config("llama", flavour, vocab_size=256)
    assert low <= llama_param_count(cfg) <= high
    assert cfg["hidden"] == LLAMA_FLAVOURS[flavour]["hidden"]


def test_counted_size_matches_built_model_and_embeddings_are_tied() -> None:
    cfg = model_config("llama", "2m", vocab_size=256)
    model = build_model(cfg)
    assert param_count(model) == llama_param_count(cfg) == 1_820_352
    assert model.task == "lm"
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "wte"
    assert not any("head" in n for n in names)  # the output projection reuses wte
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())


def test_blocks_match_torch_reference_ops() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=gen)
    w = torch.randn(8, generator=gen)
    assert torch.allclose(rms_norm(x, w), F.rms_norm(x, (8,), w, eps=1e-5), atol=1e-6)
    # rotating a query and a key by their positions leaves only the relative position in q.k
    q, k = torch.randn(1, 1, 1, 16, generator=gen), torch.randn(1, 1, 1, 16, generator=gen)
    cos, sin = rope_tables(12, 16, torch.device("cpu"))

    def score(i: int, j: int) -> float:
        qi = apply_rope(q, cos[i : i + 1], sin[i : i + 1])
        kj = apply_rope(k, cos[j : j + 1], sin[j : j + 1])
        return float((qi * kj).sum())

    assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)
    # a rotation keeps the norm
    rot = apply_rope(q.expand(1, 1, 12, 16), cos, sin)
    assert torch.allclose(rot.norm(dim=-1), q.norm(dim=-1).expand(1, 1, 12), rtol=1e-5)


def test_causal_and_deterministic() -> None:
    cfg = model_config("llama", "2m", vocab_size=32, context=16, seed=5)
    a, b = build_model(cfg), build_model(cfg)
    assert np.array_equal(flatten(a), flatten(b))
    assert not np.array_equal(flatten(a), flatten(build_model({**cfg, "seed": 6})))
    idx = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 32
    with torch.no_grad():
        out, out2 = a(idx), a(changed)
    assert out.shape == (2, 16, 32)
    assert torch.equal(out[:, :9], out2[:, :9])  # the past never sees the future
    assert not torch.equal(out[:, 9:], out2[:, 9:])
    with pytest.raises(ValueError, match="exceeds context"):
        a(torch.zeros(1, 17, dtype=torch.long))


def test_bad_configs_are_refused() -> None:
    cfg = model_config("llama", "2m", vocab_size=32)
    with pytest.raises(ValueError, match="heads"):
        build_model({**cfg, "n_heads": 5})
    with pytest.raises(ValueError, match="hidden"):
        build_model({**cfg, "hidden": 0})
    with pytest.raises(ValueError, match="vocab_size"):
        model_config("llama", "2m")


def test_flat_roundtrip_and_learns_markov_text() -> None:
    ds = load_dataset(DataSpec(kind="markov", vocab_size=16, context=32, n_train=512,
                               n_val=64, seed=0))
    cfg = model_config("llama", "2m", vocab_size=16, context=32, seed=0)
    model = build_model(cfg)
    theta = flatten(model)
    load_flat(model, theta * 0.5)
    assert np.array_equal(flatten(model), theta * 0.5)
    load_flat(model, theta)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    sampler = BatchSampler(ds.x_train, ds.y_train, batch_size=16, seed=0)
    first = last = 0.0
    for step in range(40):
        x, y = sampler.sample()
        loss = loss_fn(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = loss.item()
        first = last if step == 0 else first
    assert last < first - 0.3, (first, last)
