"""scripts/gpu_check.sh --dry: the GPU check's code on the CPU with tiny sizes, one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_prints_its_figures() -> None:
    env = {**os.environ, "DAA_GPU_CHECK_DRY": "1", "PYTHON": sys.executable}
    out = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240, check=True)
    fig = json.loads(out.stdout.strip().splitlines()[-1])
    assert fig["dry"] is True
    assert fig["device"] == "cpu (dry run)"
    assert set(fig["models"]) == {"gpt-tiny/nano", "gpt-tiny/micro", "mlp-digits/default",
                                  "mlp-digits/wide", "llama/tiny", "llama/2m"}
    assert set(fig["llama"]) == {"llama/tiny", "llama/2m"}
    assert "llama/125m" in fig["note"]  # too big for a dry run on the CPU, and said so
    for name, m in fig["models"].items():
        assert m["tokens_per_s"] > 0, name
        assert m["steps"] == 2, name
        assert m["mfu"] is None  # no known peak for a CPU
    parity = fig["bf16_parity"]
    assert parity["model"] == "llama/2m"  # the largest language model measured
    assert 0 <= parity["max_step_rel_diff"] < 0.05  # bf16 autocast tracks fp32 closely
    assert 0 <= parity["eval_rel_diff"] < 0.05
    sync = fig["outer_sync_ms"]
    assert set(sync) == {"delta_to_host", "encode", "decode_outer_step", "theta_to_device",
                         "total"}
    assert sync["total"] > 0


def test_gpu_check_without_cuda_says_so() -> None:
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = {k: v for k, v in os.environ.items() if k != "DAA_GPU_CHECK_DRY"}
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "no CUDA device" in out.stderr


def test_mfu_uses_the_cards_dense_bf16_peak() -> None:
    from bench.gpu_check import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert peak_tflops("NVIDIA H200", None) == 989.4
    assert peak_tflops("cpu (dry run)", None) is None
    assert peak_tflops("anything", 100.0) == 100.0
