""""A Little Is Enough" in its own setting: synchronous SGD, one minibatch gradient per worker.

    python -m bench.alie_sync [--workers 50] [--byzantine 0.24] [--steps 300] [--seeds 0 1 2]

bench.byzantine runs the attacks on DiLoCo rounds, where a pseudo-gradient is the sum of H
AdamW steps: there Krum and the median barely suffer from ALIE (docs/robustness.md says why).
Baruch et al. (NeurIPS 2019) attacked synchronous SGD: every step each of n workers sends the
gradient of one small minibatch, the server aggregates the n vectors and takes an SGD step.
This benchmark reproduces that setting with the project's own code: the mlp-digits model and
data (ml.zoo, ml.data), the aggregation rules (shared.aggregation, numpy
path), the attack (shared.attacks.alie with the paper's z_max(n, f)) and, for centered
clipping, worker momentum and the previous aggregate as the reference
(shared.outer.worker_momentum; Karimireddy et al. 2021). Defaults are the paper's: n = 50
workers, f = 12 attackers (24%), batch 16 per worker, SGD lr 0.1.

Prints a table (accuracy and eval loss per rule, clean and attacked, mean of the seeds) and, as
its LAST line, JSON with the same figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from bench.common import emit, print_table
from ml.data import DataSpec, load_dataset
from ml.zoo import build_model, loss_fn, model_config
from shared.aggregation import estimate_f, get_rule
from shared.attacks import alie, alie_z
from shared.outer import worker_momentum

RULES = ("mean", "median", "trimmed-mean", "krum", "centered-clipping+wm")


def run(rule: str, *, attack: bool, workers: int, byzantine: float, steps: int, lr: float,
        batch: int, seed: int, beta: float, tau: float) -> dict[str, Any]:
    torch.manual_seed(seed)
    ds = load_dataset(DataSpec(kind="digits", seed=0))
    x = torch.as_tensor(np.asarray(ds.x_train, dtype=np.float32))
    y = torch.as_tensor(np.asarray(ds.y_train, dtype=np.int64))
    xv = torch.as_tensor(np.asarray(ds.x_val, dtype=np.float32))
    yv = torch.as_tensor(np.asarray(ds.y_val, dtype=np.int64))
    model = build_model(model_config("mlp-digits", seed=seed))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(vec: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(vec, sizes)
        return {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}

    def loss_of(vec: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, unflat(vec), (xb,)), yb)

    per_worker = vmap(grad(loss_of), in_dims=(None, 0, 0))
    n_byz = round(workers * byzantine) if attack else 0
    honest_n = workers - n_byz
    f_assumed = estimate_f(workers, byzantine)
    base = rule.removesuffix("+wm")
    f_rule = max(0, estimate_f(workers, byzantine, rule=base))
    agg = get_rule(base)
    rng = np.random.default_rng(seed)
    moms: list[np.ndarray | None] = [None] * workers
    prev = np.zeros(theta.numel(), dtype=np.float32)
    for _ in range(steps):
        idx = torch.as_tensor(rng.integers(0, len(x), size=(honest_n, batch)))
        grads = per_worker(theta, x[idx], y[idx]).numpy().astype(np.float32)
        sent = [grads[i] for i in range(honest_n)]
        if rule.endswith("+wm"):
            for i in range(honest_n):
                moms[i] = np.asarray(worker_momentum(moms[i], sent[i], beta))
                sent[i] = moms[i]
        if n_byz:
            evil = np.asarray(alie(sent, n=workers, f=n_byz))
            sent = sent + [evil] * n_byz
        if base == "centered-clipping":
            out = agg(sent, f=f_rule, tau=tau, reference=prev)
        else:
            out = agg(sent, f=f_rule)
        prev = np.asarray(out, dtype=np.float32)
        theta = theta - lr * torch.as_tensor(prev)
    with torch.no_grad():
        logits = functional_call(model, unflat(theta), (xv,))
        acc = float((logits.argmax(-1) == yv).float().mean())
        val = float(loss_fn(logits, yv))
    return {"rule": rule, "attack": "alie" if attack else "clean", "seed": seed,
            "accuracy": acc, "eval_loss": val, "f_assumed": f_assumed, "byzantine": n_byz}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.alie_sync", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=50)
    p.add_argument("--byzantine", type=float, default=0.24)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--beta", type=float, default=0.9, help="worker momentum for +wm")
    p.add_argument("--tau", type=float, default=1.0, help="centered clipping radius")
    p.add_argument("--rules", nargs="+", default=list(RULES))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    n_byz = round(args.workers * args.byzantine)
    z = alie_z(args.workers, n_byz)
    rows = []
    for rule in args.rules:
        for attack in (False, True):
            for seed in args.seeds:
                r = run(rule, attack=attack, workers=args.workers, byzantine=args.byzantine,
                        steps=args.steps, lr=args.lr, batch=args.batch, seed=seed,
                        beta=args.beta, tau=args.tau)
                rows.append(r)
                print(f"{rule:22s} {r['attack']:5s} seed {seed}: accuracy {r['accuracy']:.3f},"
                      f" eval loss {r['eval_loss']:.3f}", file=sys.stderr, flush=True)
    table = []
    figures: dict[str, Any] = {}
    for rule in args.rules:
        cell: dict[str, tuple[float, float]] = {}
        for kind in ("clean", "alie"):
            rs = [r for r in rows if r["rule"] == rule and r["attack"] == kind]
            cell[kind] = (statistics.fmean(r["accuracy"] for r in rs),
                            statistics.fmean(r["eval_loss"] for r in rs))
        (ca, cl), (aa, al) = cell["clean"], cell["alie"]
        table.append({"rule": rule, "clean_acc_%": round(100 * ca, 1),
                      "alie_acc_%": round(100 * aa, 1), "drop_points": round(100 * (ca - aa), 1),
                      "clean_loss": round(cl, 3), "alie_loss": round(al, 3),
                      "loss_ratio": round(al / cl, 2)})
        figures[rule] = {"clean_acc": round(ca, 4), "alie_acc": round(aa, 4),
                         "clean_loss": round(cl, 4), "alie_loss": round(al, 4)}
    print(f"synchronous SGD on mlp-digits: {args.workers} workers, {n_byz} ALIE attackers "
          f"(z_max {z:.2f}), batch {args.batch}, lr {args.lr}, {args.steps} steps, seeds "
          f"{args.seeds}; centered clipping: tau {args.tau}, worker momentum {args.beta}, "
          f"reference = last aggregate")
    print_table(table, ["rule", "clean_acc_%", "alie_acc_%", "drop_points", "clean_loss",
                        "alie_loss", "loss_ratio"])
    emit({"workers": args.workers, "byzantine": n_byz, "z": round(z, 3), "steps": args.steps,
          "seeds": args.seeds, "rules": figures,
          "wall_s": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
