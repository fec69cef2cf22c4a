"""Flower's side of bench.vs_flower. Runs INSIDE Flower's own venv (flwr[simulation], torch,
scikit-learn; see bench.vs_flower), from the repository root, never in the project's:

    VENV/bin/python -m bench.flower_side --clients 1000 --rounds 3 --inner-steps 50

Flower's Ray simulation (flwr.simulation.run_simulation, Message API: a ServerApp running
FedAvg, a ClientApp per virtual supernode) with the work each of our simulated nodes does
(bench.sim_nodes.SharedTrainer with a fresh optimizer): the same zoo model (mlp-digits, same
seeded initialisation), the same iid shards of digits (ml.data.assign_shards with one shard
per client), the same per-client seeded BatchSampler, the same inner loop (AdamW lr 1e-2,
betas (0.9, 0.95), weight decay 0.01, grad-norm clip 1.0, batch 32, --inner-steps steps).
Round times are taken at Flower's centralized evaluation after each round.

Prints, as its LAST line, JSON: clients, rounds, round_s (per round), eval_loss, accuracy,
replies (clients whose training came back, per round: all, or it fails), wall_s, flwr and ray
versions.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import time
from typing import Any

import numpy as np
import torch

from ml.data import BatchSampler, assign_shards
from ml.workload import Workload, resolve
from ml.zoo import loss_fn


@functools.cache
def _work(seed: int) -> Workload:
    return resolve(model="mlp-digits", flavour=None, data=None, data_path=None,
                   partition="iid", alpha=0.5, seed=seed)


@functools.cache
def _owner(seed: int, n_shards: int) -> tuple[np.ndarray, np.ndarray]:
    w = _work(seed)
    owner = assign_shards(w.dataset.keys_train, n_shards=n_shards, partition="iid",
                          alpha=0.5, seed=w.data_spec.seed)
    by_shard = np.argsort(owner, kind="stable")
    return by_shard, np.searchsorted(owner[by_shard], np.arange(n_shards + 1))


def local_train(seed: int, n_shards: int, client: int, state: dict[str, torch.Tensor], *,
                steps: int, lr: float, batch_size: int) -> tuple[dict[str, torch.Tensor],
                                                                 float, int]:
    """One client's round: the inner loop of our simulated node, fresh AdamW."""
    torch.set_num_threads(1)
    w = _work(seed)
    by_shard, starts = _owner(seed, n_shards)
    idx = np.sort(by_shard[starts[client]:starts[client + 1]]).astype(np.int64)
    sampler = BatchSampler(w.dataset.x_train, w.dataset.y_train, idx, batch_size=batch_size,
                           seed=int.from_bytes(hashlib.sha256(
                               f"{seed}:{client}".encode()).digest()[:4], "little"))
    model = w.new_model()
    model.load_state_dict(state)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    losses = []
    for _ in range(steps):
        xb, yb = sampler.sample()
        loss = loss_fn(model(torch.from_numpy(np.ascontiguousarray(xb))),
                       torch.from_numpy(np.ascontiguousarray(yb)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return model.state_dict(), float(np.mean(losses)), steps * batch_size


def evaluate(seed: int, state: dict[str, torch.Tensor]) -> tuple[float, float]:
    w = _work(seed)
    model = w.new_model()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(w.dataset.x_val)))
        y = torch.from_numpy(np.ascontiguousarray(w.dataset.y_val))
        return float(loss_fn(logits, y)), float((logits.argmax(-1) == y).float().mean())


def run(clients: int, rounds: int, steps: int, seed: int) -> dict[str, Any]:
    import flwr
    import ray
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.client import ClientApp
    from flwr.server import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
    from flwr.simulation import run_simulation

    from bench import flower_side as me  # by name: Ray pickles __main__'s functions by value

    out: dict[str, Any] = {"clients": clients, "rounds": rounds, "round_s": [],
                           "eval_loss": [], "accuracy": [], "replies": []}
    client_app, server_app = ClientApp(), ServerApp()

    @client_app.train()  # type: ignore[untyped-decorator]
    def train(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        state, loss, samples = me.local_train(
            int(cfg["seed"]), int(cfg["n_shards"]), int(context.node_config["partition-id"]),
            msg.content["arrays"].to_torch_state_dict(), steps=int(cfg["steps"]),
            lr=float(cfg["lr"]), batch_size=int(cfg["batch_size"]))
        return Message(content=RecordDict({
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": samples})}),
            reply_to=msg)

    @server_app.main()  # type: ignore[untyped-decorator]
    def main(grid: Grid, context: Context) -> None:
        marks: list[float] = []

        def central(round_: int, arrays: ArrayRecord) -> MetricRecord:
            marks.append(time.perf_counter())
            loss, acc = me.evaluate(seed, arrays.to_torch_state_dict())
            if round_ > 0:
                out["round_s"].append(round(marks[-1] - marks[-2], 2))
                out["eval_loss"].append(loss)
                out["accuracy"].append(acc)
            marks[-1] = time.perf_counter()  # the next round starts after this evaluation
            return MetricRecord({"loss": loss, "accuracy": acc})

        def train_metrics(replies: list[RecordDict], key: str) -> MetricRecord:
            out["replies"].append(len(replies))  # clients whose training came back
            return aggregate_metricrecords(replies, key)

        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients,
                          min_available_nodes=clients, train_metrics_aggr_fn=train_metrics)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(me._work(seed).new_model()
                                                             .state_dict()),
                       num_rounds=rounds, evaluate_fn=central, train_config=ConfigRecord({
                           "seed": seed, "n_shards": clients, "steps": steps, "lr": 1e-2,
                           "batch_size": 32}))

    t0 = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"include_dashboard": False}})
    out.update(wall_s=round(time.perf_counter() - t0, 2), flwr=flwr.__version__,
               ray=ray.__version__)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flower_side", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--inner-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = run(args.clients, args.rounds, args.inner_steps, args.seed)
    if len(out["round_s"]) != args.rounds or out["replies"] != [args.clients] * args.rounds:
        raise SystemExit(f"Flower finished {len(out['round_s'])} of {args.rounds} rounds, "
                         f"client replies per round {out['replies']} of {args.clients}")
    print(json.dumps(out, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
