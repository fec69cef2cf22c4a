"""A short check of the native node's CUDA path (`scripts/gpu_check.sh`, under 5 minutes).

    python -m bench.gpu_check            on a machine with a CUDA device
    python -m bench.gpu_check --dry      the same code on the CPU with tiny sizes (the tests)

Prints ONE JSON line (the last line):
- `device`: the device's name (`torch.cuda.get_device_name`; "cpu (dry run)" when dry);
- `models`: for every flavour of the zoo's models, the trainer's inner steps (native_node.trainer:
  bf16 autocast, fused AdamW and θ on the device on CUDA) as `tokens_per_s` (for mlp-digits a
  token is one sample) and `mfu`, model FLOPs utilization: training FLOPs (6 x params per
  token, plus attention's 12 x layers x d_model x context for the language models) per second
  over the device's dense bf16 peak (a table of known cards, or --peak-tflops; null when
  unknown). `llama` repeats the llama flavours' rows; a dry run on the CPU skips flavours over
  DRY_MAX_PARAMS (llama 20m and 125m) and `note` says so;
- `bf16_parity`: the same steps from the same θ on the same batches in fp32 and under bf16
  autocast: per-step losses and the final held-out loss, relative differences;
- `outer_sync_ms`: one outer sync of the largest language model measured, without
  the network: Δ from the device through pinned memory, raw32 encode, decode, the outer
  Nesterov step, θ back to the device.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np
import torch

from ml.inner_opt import make_inner_opt
from ml.workload import Workload, initial_params, resolve
from ml.zoo import MODELS, evaluate, loss_fn
from native_node.trainer import DeviceParams, Trainer

# dense bf16 peak TFLOP/s (no sparsity) by a substring of the device name; first match wins
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
               ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
               ("RTX 4090", 165.2)]
DRY_MAX_PARAMS = 2_000_000  # a dry run on the CPU: flavours above this are skipped


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((tf for key, tf in PEAK_TFLOPS if key in name), None)


def train_flops_per_token(work: Workload) -> float:
    cfg = work.model_config
    flops = 6.0 * work.n_params
    if cfg.get("task") == "lm":
        flops += 12.0 * float(cfg["n_layers"]) * float(cfg["d_model"]) * float(cfg["context"])
    return flops


def tokens_per_sample(work: Workload) -> int:
    return int(work.model_config["context"]) if work.model_config.get("task") == "lm" else 1


def workload(model: str, flavour: str) -> Workload:
    return resolve(model=model, flavour=flavour, data=None, data_path=None, partition="iid",
                   alpha=0.5, seed=0)


def throughput(work: Workload, device: str, *, batch: int, steps: int, warmup: int,
               peak: float | None) -> dict[str, Any]:
    """The trainer's inner steps: tokens/s over the steps' compute time, and MFU."""
    trainer = Trainer(work, shard=0, n_shards=1, node_id="gpu-check", device=device)
    theta = initial_params(work)
    trainer.train_round(theta, steps=warmup, lr=1e-3, batch_size=batch)  # kernels, allocator
    res = trainer.train_round(theta, steps=steps, lr=1e-3, batch_size=batch)
    tokens = res.steps * batch * tokens_per_sample(work)
    tps = tokens / res.compute_s
    flops = tps * train_flops_per_token(work)
    return {"params": work.n_params, "batch": batch, "steps": res.steps,
            "tokens_per_s": round(tps, 1), "tflops": round(flops / 1e12, 4),
            "mfu": None if peak is None else round(flops / (peak * 1e12), 6),
            "optimizer": type(trainer.opt).__name__}


def parity(work: Workload, device: torch.device, *, batch: int, steps: int) -> dict[str, Any]:
    """fp32 vs bf16 autocast: the same θ, batches and optimizer; losses compared."""
    gen = np.random.default_rng(0)
    ds = work.dataset
    picks = [gen.choice(len(ds.x_train), size=batch, replace=False) for _ in range(steps)]
    runs: dict[str, Any] = {}
    for label, bf16 in (("fp32", False), ("bf16", True)):
        model = work.new_model().to(device)
        opt = make_inner_opt(model.parameters(), lr=1e-3, device=device)
        losses = []
        for idx in picks:
            x = torch.from_numpy(np.ascontiguousarray(ds.x_train[idx])).to(device)
            y = torch.from_numpy(np.ascontiguousarray(ds.y_train[idx])).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
        runs[label] = {"losses": losses, "eval_loss": evaluate(model, ds.x_val, ds.y_val)}
    a, b = runs["fp32"], runs["bf16"]
    rel = [abs(y - x) / abs(x) for x, y in zip(a["losses"], b["losses"], strict=True)]
    return {"model": f"{work.model_config['name']}/{work.model_config['flavour']}",
            "steps": steps, "train_loss_fp32": round(a["losses"][-1], 5),
            "train_loss_bf16": round(b["losses"][-1], 5), "max_step_rel_diff": round(max(rel), 5),
            "eval_loss_fp32": round(a["eval_loss"], 5), "eval_loss_bf16": round(b["eval_loss"], 5),
            "eval_rel_diff": round(abs(b["eval_loss"] - a["eval_loss"]) / a["eval_loss"], 5)}


def outer_sync(work: Workload, device: torch.device, repeats: int) -> dict[str, float]:
    """One outer sync's local work, median over `repeats` (ms per part and in total)."""
    from shared.codecs import get_codec
    from shared.outer import outer_step

    model = work.new_model().to(device)
    params = DeviceParams(model, device)
    theta = initial_params(work)
    momentum = np.zeros_like(theta)
    codec = get_codec("raw32")
    parts: dict[str, list[float]] = {"delta_to_host": [], "encode": [], "decode_outer_step": [],
                                     "theta_to_device": []}
    for _ in range(repeats):
        params.set_theta(theta)
        params.to_model()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.999)  # as if trained
        t0 = time.perf_counter()
        delta = params.delta()
        t1 = time.perf_counter()
        payload = codec.encode(delta)
        t2 = time.perf_counter()
        grad = np.asarray(codec.decode(payload, len(delta)), dtype=np.float32)
        new_theta, _ = outer_step(theta, grad, momentum)
        t3 = time.perf_counter()
        params.set_theta(np.asarray(new_theta, dtype=np.float32))
        params.to_model()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t4 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[key].append(dt * 1e3)
    out = {k: round(float(np.median(v)), 3) for k, v in parts.items()}
    out["total"] = round(sum(out.values()), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true",
                   default=os.environ.get("DAA_GPU_CHECK_DRY") == "1",
                   help="run on the CPU with tiny sizes (also DAA_GPU_CHECK_DRY=1)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (for MFU)")
    args = p.parse_args(argv)
    t_start = time.monotonic()
    if args.dry:
        dev, name = "cpu", "cpu (dry run)"
        batch, steps, warmup, parity_steps, repeats = 4, 2, 1, 3, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or --dry for the CPU")
        dev, name = "cuda", torch.cuda.get_device_name(0)
        batch, steps, warmup, parity_steps, repeats = 64, 50, 10, 50, 5
    peak = peak_tflops(name, args.peak_tflops)
    models: dict[str, Any] = {}
    works: dict[str, Workload] = {}
    skipped: list[str] = []
    for model, entry in MODELS.items():
        for flavour in entry.flavours:
            key = f"{model}/{flavour}"
            work = workload(model, flavour)
            if args.dry and work.n_params > DRY_MAX_PARAMS:
                skipped.append(key)
                continue
            works[key] = work
            models[key] = throughput(work, dev, batch=batch, steps=steps, warmup=warmup,
                                     peak=peak)
            print(f"{key}: {models[key]}", flush=True)
    note = (f"dry run: skipped {', '.join(skipped)} (over {DRY_MAX_PARAMS:,} parameters)"
            if skipped else "every flavour of the zoo measured")
    lm = [k for k in works if works[k].model_config.get("task") == "lm"]
    biggest = max(lm, key=lambda k: works[k].n_params)
    bf16 = parity(works[biggest], torch.device(dev), batch=batch, steps=parity_steps)
    print(f"bf16 parity: {bf16}", flush=True)
    sync = outer_sync(works[biggest], torch.device(dev), repeats)
    print(f"outer sync ({biggest}): {sync}", flush=True)
    print(json.dumps({
        "check": "gpu", "dry": args.dry, "device": name, "device_type": dev,
        "torch": torch.__version__, "cuda": torch.version.cuda, "peak_tflops": peak,
        "models": models, "llama": {k: v for k, v in models.items() if k.startswith("llama/")},
        "note": note, "bf16_parity": bf16,
        "outer_sync_ms": sync, "outer_sync_model": biggest,
        "wall_s": round(time.monotonic() - t_start, 1)},
        sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
