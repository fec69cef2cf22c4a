"""ml/inner_opt.py: the written-out AdamW equals torch.optim.AdamW bit for bit (CPU)
and never imports torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import torch

from ml.inner_opt import InnerAdamW
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
