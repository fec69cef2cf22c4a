"""ml/inner_opt.py: the written-out AdamW equals torch.optim.AdamW bit for bit (CPU)
and never imports torch._dynamo; the fused AdamW (CUDA, large models) takes the same steps;
the trainer's device-side θ and Δ (native_node/trainer.py DeviceParams)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ml.inner_opt import FusedAdamW, InnerAdamW, make_inner_opt
from ml.zoo import build_model, loss_fn, model_config


def test_same_bits_as_torch_adamw_over_steps_and_lr_changes() -> None:
    cfg = model_config("gpt-tiny", "nano", vocab_size=32, context=16, seed=3)
    a, b = build_model(cfg), build_model(cfg)
    b.load_state_dict(a.state_dict())
    ours = InnerAdamW(a.parameters(), lr=0.01, betas=(0.9, 0.95), weight_decay=0.01)
    ref = torch.optim.AdamW(b.parameters(), lr=0.01, betas=(0.9, 0.95), weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        x = torch.randint(0, 32, (4, 16), generator=gen)
        y = torch.randint(0, 32, (4, 16), generator=gen)
        lr = 0.01 if step < 6 else 0.003  # a new round may bring a new inner lr
        ours.lr = lr
        for group in ref.param_groups:
            group["lr"] = lr
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.equal(pa, pb), f"step {step}: {name} differs"


def test_building_a_trainer_step_does_not_import_dynamo() -> None:
    code = ("import sys, torch\n"
            "from ml.inner_opt import InnerAdamW\n"
            "m = torch.nn.Linear(3, 2)\n"
            "o = InnerAdamW(m.parameters(), lr=0.1)\n"
            "m(torch.ones(1, 3)).sum().backward(); o.step()\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_fused_adamw_takes_the_same_steps_and_is_chosen_for_cuda_and_large_models(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import ml.inner_opt as inner_opt

    cfg = model_config("gpt-tiny", "nano", vocab_size=32, context=16, seed=3)
    a, b = build_model(cfg), build_model(cfg)
    b.load_state_dict(a.state_dict())
    cpu = torch.device("cpu")
    ours = make_inner_opt(a.parameters(), lr=0.01, device=cpu)
    fused = make_inner_opt(b.parameters(), lr=0.01, device=torch.device("cuda"))
    assert isinstance(ours, InnerAdamW)
    assert isinstance(fused, FusedAdamW)  # on CUDA always (built here over CPU tensors)
    assert fused.opt.defaults["fused"] is True
    gen = torch.Generator().manual_seed(0)
    for step in range(8):
        x = torch.randint(0, 32, (4, 16), generator=gen)
        y = torch.randint(0, 32, (4, 16), generator=gen)
        ours.lr = fused.lr = 0.01 if step < 4 else 0.003
        for model, opt in ((a, ours), (b, fused)):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    assert fused.lr == 0.003
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        # equal up to rounding; a step moves a weight by up to lr = 0.01, and Adam's g/sqrt(v)
        # magnifies rounding where gradients are ~0 (attention key biases): 3.6e-5 seen
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-4, msg=name)
    monkeypatch.setattr(inner_opt, "FUSED_MIN_PARAMS", 1000)  # "large" on CPU too
    assert isinstance(make_inner_opt(a.parameters(), lr=0.01, device=cpu), FusedAdamW)
    assert isinstance(make_inner_opt(torch.nn.Linear(3, 2).parameters(), lr=0.01,
                                     device=cpu), InnerAdamW)


def test_device_params_delta_is_theta_minus_the_model() -> None:
    import numpy as np

    from ml.zoo import flatten
    from native_node.trainer import DeviceParams, autocast

    model = build_model(model_config("mlp-digits", seed=1))
    params = DeviceParams(model, torch.device("cpu"))
    assert params.host is None  # a (pinned) host buffer only on CUDA; on CPU Δ is handed out
    theta = np.random.default_rng(0).standard_normal(params.n).astype(np.float32)
    params.set_theta(theta)
    params.to_model()
    assert np.array_equal(flatten(model), theta)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    delta = params.delta()
    assert np.array_equal(delta, theta - flatten(model))
    params.delta()[:] = 0  # a new array each time: the caller may keep it
    assert np.array_equal(delta, theta - flatten(model))
    with autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled()
