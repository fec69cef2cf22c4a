"""Client-level DP on mlp-digits: 1,000 participants, per-round Poisson sampling, the loss it
costs and the epsilon it spends.

    python -m bench.dp [--participants 1000] [--rate 0.5] [--sigma 2.8] [--clip 0.5]
        [--rounds 60] [--inner-lr 1e-3] [--delta 1e-5] [--seeds 0,1,2]
        [--out bench/results/dp.txt]

A vectorised simulation of the same math the real participant and coordinator run (at 1,000
participants, 60 rounds, 2 runs and 3 seeds the in-process swarm of bench.simulate would need
1,000 ML-DSA identities and about 70,000 signed Submits; tests/test_dp_run.py drives that path
instead):

- participants: the run's digits training split in 1,000 iid shards (ml.data.assign_shards);
- each round, the coordinator's Poisson sample (shared.dp.poisson_sample, rate q, the run's
  seed); an empty draw is drawn again and counted;
- each sampled participant runs `inner_steps` AdamW steps (lr 1e-2, betas 0.9/0.95, weight
  decay 0.01, fresh state each round, as a node without kept state) on batches of its own
  shard; all of them at once as one batched model (independent per participant: the loss is
  a sum over participants and AdamW is elementwise);
- each update goes through shared.dp.privatize (clip to C, add N(0, sigma^2 C^2 / m)), the
  same function the participant calls before encoding; the server's mean
  (shared.aggregation "mean") and the outer Nesterov step (shared.outer.outer_step);
- epsilon from dp-accounting (server.dp_accountant.epsilon): RDP (reported) and PLD.

The non-private run is the same schedule and samples without clipping or noise. Losses are
the final held-out loss, averaged over the seeds; `loss_gap` is
(loss_private - loss_nonprivate) / loss_nonprivate. Epsilon counts the most draws any seed
took (a round whose draw was empty is drawn again). The reference
check (Abadi et al.: sigma 1.1, q 256/60000, 14,062 steps, delta 1e-5: epsilon about 2.60 RDP
and 2.39 PLD) runs too and is in the JSON.

LAST stdout line: JSON with participants, per_round (mean sampled), rounds, sigma, clip,
sample_rate, epsilon, epsilon_pld, delta, accountant, loss_nonprivate, loss_private,
loss_gap, acc_nonprivate, acc_private, reference, wall_s.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml.data import assign_shards
from ml.workload import resolve
from ml.zoo import loss_fn
from server.dp_accountant import epsilon
from shared.aggregation import get_rule
from shared.dp import poisson_sample, privatize
from shared.outer import OuterConfig, outer_step

NAMES = ("w1", "b1", "w2", "b2")  # MLPDigits.named_parameters() order (the flat layout)


def _unflatten(theta: np.ndarray, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    out, off = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(torch.from_numpy(theta[off:off + n].copy()).reshape(shape))
        off += n
    return out


def _forward(ps: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Batched MLPDigits: params [m, ...], x [m, B, 64] -> logits [m, B, 10]."""
    w1, b1, w2, b2 = ps
    h = torch.relu(torch.bmm(x, w1.transpose(1, 2)) + b1[:, None, :])
    return torch.bmm(h, w2.transpose(1, 2)) + b2[:, None, :]


def local_updates(theta: np.ndarray, shapes: list[tuple[int, ...]], shards: list[np.ndarray],
                  x: np.ndarray, y: np.ndarray, *, steps: int, batch: int, lr: float,
                  rng: np.random.Generator) -> np.ndarray:
    """theta - theta_i for each participant (one row each) after `steps` AdamW steps."""
    m = len(shards)
    base = _unflatten(theta, shapes)
    ps = [t.unsqueeze(0).repeat(m, *([1] * t.dim())).requires_grad_(True) for t in base]
    opt = torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        pick = np.stack([s[rng.integers(len(s), size=batch)] for s in shards])  # [m, B]
        idx = torch.from_numpy(pick)
        logits = _forward(ps, xt[idx])
        onehot = (yt[idx][..., None] == torch.arange(logits.shape[-1])).to(logits.dtype)
        per = -(torch.log_softmax(logits, -1) * onehot).sum(-1).mean(-1)  # [m]
        opt.zero_grad()
        per.sum().backward()
        opt.step()
    with torch.no_grad():
        flat = torch.cat([(b.unsqueeze(0) - p).reshape(m, -1) for b, p in zip(base, ps,
                                                                                strict=True)], 1)
    return flat.numpy().astype(np.float32)


def evaluate(theta: np.ndarray, shapes: list[tuple[int, ...]], x: np.ndarray,
             y: np.ndarray) -> tuple[float, float]:
    ps = [t.unsqueeze(0) for t in _unflatten(theta, shapes)]
    with torch.no_grad():
        logits = _forward(ps, torch.from_numpy(x)[None])[0]
        loss = float(loss_fn(logits, torch.from_numpy(y)))
        acc = float((logits.argmax(-1) == torch.from_numpy(y)).float().mean())
    return loss, acc


def run(*, participants: int, rate: float, sigma: float, clip: float, rounds: int,
        inner_steps: int, batch: int, inner_lr: float, outer_lr: float, seed: int,
        private: bool, say: Any, outer_momentum: float = 0.9) -> dict[str, Any]:
    wl = resolve(model="mlp-digits", flavour=None, data="digits", data_path=None,
                 partition="iid", alpha=0.5, seed=seed)
    ds = wl.dataset
    model = wl.new_model()
    shapes = [tuple(p.shape) for _, p in model.named_parameters()]
    assert [n for n, _ in model.named_parameters()] == list(NAMES)
    theta = np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])
    theta = theta.astype(np.float32)
    owner = assign_shards(ds.keys_train, n_shards=participants, partition="iid", alpha=0.5,
                          seed=seed)
    shards = [np.flatnonzero(owner == i) for i in range(participants)]
    if min(len(s) for s in shards) == 0:
        raise ValueError(f"{participants} participants leave some shard empty")
    x = np.asarray(ds.x_train, np.float32)
    y = np.asarray(ds.y_train, np.int64)
    xv, yv = np.asarray(ds.x_val, np.float32), np.asarray(ds.y_val, np.int64)
    ids = [f"{i:064x}" for i in range(participants)]
    momentum = np.zeros_like(theta)
    outer = OuterConfig(lr=outer_lr, momentum=outer_momentum)
    mean = get_rule("mean")
    rng = np.random.default_rng(seed + 1)
    torch.manual_seed(seed)
    steps, sizes = 0, []
    for r in range(rounds):
        picked, draws = poisson_sample(seed, r, ids, rate)
        steps += draws
        sizes.append(len(picked))
        rows = local_updates(theta, shapes, [shards[int(n, 16)] for n in picked], x, y,
                             steps=inner_steps, batch=batch, lr=inner_lr, rng=rng)
        if private:
            # the participant's noise comes from OS entropy; here from (seed, round, node)
            # so that a rerun repeats the figures
            rows = np.stack([privatize(row, clip=clip, sigma=sigma, participants=len(picked),
                                       seed=seed * 1_000_003 + r * 10_007 + int(n, 16))[0]
                             for row, n in zip(rows, picked, strict=True)])
        agg = np.asarray(mean(list(rows), f=0), np.float32)
        theta, momentum = outer_step(theta, agg, momentum, outer)
        if (r + 1) % 10 == 0 or r == rounds - 1:
            loss, acc = evaluate(theta, shapes, xv, yv)
            say(f"  {'private' if private else 'non-private'} round {r + 1}: "
                f"{len(picked)} sampled, eval loss {loss:.4f}, accuracy {acc:.3f}")
    loss, acc = evaluate(theta, shapes, xv, yv)
    return {"loss": loss, "accuracy": acc, "steps": steps, "per_round": float(np.mean(sizes))}


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _job(kw: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    logging.getLogger("absl").setLevel(logging.ERROR)
    return run(**{**kw, "say": _stderr})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--participants", type=int, default=1618,
                   help="one per training example of digits by default")
    p.add_argument("--rate", type=float, default=0.3, help="Poisson sampling rate q")
    p.add_argument("--sigma", type=float, default=1.75, help="noise multiplier of the sum")
    p.add_argument("--clip", type=float, default=0.5, help="L2 clip norm C of an update")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--inner-steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inner-lr", type=float, default=1e-3)
    p.add_argument("--outer-lr", type=float, default=0.7)
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seeds", default="0,1,2", help="runs averaged (data split, init, "
                   "sampling and batches all follow the seed)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    p.add_argument("--out", default="bench/results/dp.txt")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("absl").setLevel(logging.ERROR)
    t0 = time.perf_counter()

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    seeds = [int(x) for x in a.seeds.split(",")]
    kw = {"participants": a.participants, "rate": a.rate, "sigma": a.sigma, "clip": a.clip,
          "rounds": a.rounds, "inner_steps": a.inner_steps, "batch": a.batch,
          "inner_lr": a.inner_lr, "outer_lr": a.outer_lr,
          "outer_momentum": a.outer_momentum, "say": say}
    tasks = [{**kw, "seed": seed, "private": private} for seed in seeds
             for private in (False, True)]
    if a.jobs > 1:  # each run is independent and seeded: the same figures in any order
        with multiprocessing.get_context("spawn").Pool(a.jobs) as pool:
            results = pool.map(_job, [{**t, "say": None} for t in tasks])
    else:
        results = [run(**t) for t in tasks]
    plains = [r for t, r in zip(tasks, results, strict=True) if not t["private"]]
    privs = [r for t, r in zip(tasks, results, strict=True) if t["private"]]

    def avg(runs: list[dict[str, Any]], key: str) -> float:
        return float(np.mean([r[key] for r in runs]))

    plain = {k: avg(plains, k) for k in ("loss", "accuracy", "per_round")}
    priv = {k: avg(privs, k) for k in ("loss", "accuracy", "per_round")}
    steps = int(max(r["steps"] for r in privs))  # the largest count of draws of any seed
    eps = {acc: epsilon(sigma=a.sigma, q=a.rate, steps=steps, delta=a.delta,
                        accountant=acc) for acc in ("rdp", "pld")}
    ref: dict[str, Any] = {"sigma": 1.1, "q": 256 / 60000, "steps": 14062, "delta": 1e-5}
    reference = {acc: round(epsilon(**ref, accountant=acc), 4) for acc in ("rdp", "pld")}
    gap = (priv["loss"] - plain["loss"]) / plain["loss"]
    out = {"participants": a.participants, "per_round": round(priv["per_round"], 1),
           "rounds": a.rounds, "accountant_steps": steps, "sigma": a.sigma,
           "clip": a.clip, "sample_rate": a.rate, "outer_lr": a.outer_lr,
           "outer_momentum": a.outer_momentum, "epsilon": round(eps["rdp"], 4),
           "epsilon_pld": round(eps["pld"], 4), "delta": a.delta, "accountant": "rdp",
           "loss_nonprivate": round(plain["loss"], 4), "loss_private": round(priv["loss"], 4),
           "loss_gap": round(gap, 4), "acc_nonprivate": round(plain["accuracy"], 4),
           "acc_private": round(priv["accuracy"], 4), "inner_steps": a.inner_steps,
           "seeds": seeds, "loss_private_by_seed": [round(r["loss"], 4) for r in privs],
           "loss_nonprivate_by_seed": [round(r["loss"], 4) for r in plains],
           "simulation": "vectorised (shared.dp.privatize per participant, batched AdamW)",
           "reference": {**ref, "epsilon": reference},
           "targets_met": bool(eps["rdp"] <= 8 and a.delta <= 1e-5 and gap <= 0.15),
           "wall_s": round(time.perf_counter() - t0, 1)}
    table = [
        "| run | eval loss | accuracy |", "|---|---|---|",
        f"| non-private | {out['loss_nonprivate']} | {out['acc_nonprivate']} |",
        f"| DP (C {a.clip}, sigma {a.sigma}, q {a.rate}) | {out['loss_private']} | "
        f"{out['acc_private']} |", "",
        f"mean of seeds {seeds}; {a.participants} participants, {out['per_round']} sampled "
        "per round on average, "
        f"{a.rounds} rounds ({steps} accounted draws): epsilon {out['epsilon']} (RDP), "
        f"{out['epsilon_pld']} (PLD) at delta {a.delta:g}; loss gap {out['loss_gap']:+.1%}",
        f"reference (sigma 1.1, q 256/60000, 14,062 steps, delta 1e-5): RDP "
        f"{reference['rdp']}, PLD {reference['pld']}",
    ]
    text = "\n".join(table) + "\n" + json.dumps(out)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
