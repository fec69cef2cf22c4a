"""The autonomy loop against the best fixed settings, on a modelled heterogeneous population.

    python -m bench.autotune [--horizon-s 10] [--target 0.2] [--seed 0]
                             [--population mixed|tab-heavy] [--quick]

A deterministic simulator in VIRTUAL time: each participant's compute and link are modelled
from stated figures (POPULATION below; docs/autotune.md), the training math is real
(mlp-digits on the digits data with the run's defaults, 8 iid shards shared round-robin as
server.store hands them out: AdamW inner steps with the simulator's shared trainer,
bench.sim_nodes, each node's AdamW state kept across rounds;
error-feedback codecs through shared.update_encoding.encode_update, the participant's encoder;
the server's step-weighted mean (server.reduction) and outer Nesterov step, shared.outer).
Nothing here reads a wall clock for a result: a run's times are the model's.

One round, as modelled: the RoundOpen reaches node i after latency_i + 4n bytes / down_i;
it trains k_i steps (a fixed H, or as many as fit in the budget: shared.autotune's
continue_training with step time step_i, the rule every runtime applies), then its update
(its real encoded size + FRAME_OVERHEAD bytes of header and ML-DSA-65 signature) reaches the
server after latency_i + bytes / up_i. The round commits when every node's update is in, or at
the deadline with at least the quorum (later updates are dropped, as with stale_policy drop;
a deadline with fewer than the quorum waits for the quorum-th update), plus SERVER_S for the
reduction, evaluation and commit. One tab's link degrades 10x (both ways) at
DEGRADE_AT x the horizon. A run is measured up to the horizon: a round that would commit
after it does not count (the run holds the model of its last commit by then), the same rule
for every run compared.

Compared, with the same horizon and target eval loss:

- `auto`: shared.autotune.Autotuner, as the coordinator runs it (run defaults: H = 50 for the
  first round, quorum 1, deadline 60 s, step cap 10 x H), fed each round's modelled measures:
  nothing in it is set for this population;
- a grid of fixed settings: H in GRID_H x codec in GRID_CODECS (12), each node trains H steps,
  the run's deadline; `best_fixed` is the one that reaches the target first (ties: lower
  final loss);
- one participant alone (each device kind, with all the data, H = 50, raw32): the speedup.

Prints a table and as its LAST line JSON: population, auto {time_to_target_s, final_loss,
best_loss, decisions}, best_fixed {config, time_to_target_s, final_loss, best_loss}, grid_size,
speedup_vs_one_node (one fast box alone / auto, the most conservative baseline) and per kind.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bench.sim_nodes import SharedTrainer
from ml.data import BatchSampler, assign_shards
from ml.workload import Workload, initial_params, resolve
from ml.zoo import load_flat, loss_fn
from shared.autotune import (
    Autotuner,
    Limits,
    NodeSample,
    RoundSample,
    codec_label,
    continue_training,
)
from shared.codecs import decode_update, make_codec
from shared.outer import OuterConfig, outer_step
from shared.update_encoding import encode_update

MBIT = 1e6 / 8  # bytes per second in one Mbit/s
FRAME_OVERHEAD = 3309 + 700  # ML-DSA-65 signature + JSON header, per frame (bytes)
SERVER_S = 0.05  # reduction + evaluation + commit, per round
DEGRADE_AT = 0.3  # share of the horizon after which one tab's link is 10x slower
# (kind, count, seconds per inner step at batch 32, down Mbit/s, up Mbit/s, latency s)
POPULATION: tuple[tuple[str, int, float, float, float, float], ...] = (
    ("fast box", 2, 0.002, 1000.0, 1000.0, 0.005),
    ("slow box", 6, 0.016, 50.0, 10.0, 0.02),
    ("tab", 8, 0.055, 10.0, 1.0, 0.04),
)
# --population: the mix (the default) and a variant with the same device figures,
# mostly tabs (chosen before any run of it, to check nothing is fitted to the default mix)
POPULATIONS: dict[str, tuple[tuple[str, int, float, float, float, float], ...]] = {
    "mixed": POPULATION,
    "tab-heavy": (("fast box", 1, 0.002, 1000.0, 1000.0, 0.005),
                  ("slow box", 3, 0.016, 50.0, 10.0, 0.02),
                  ("tab", 12, 0.055, 10.0, 1.0, 0.04)),
}
GRID_H = (10, 25, 50, 100)
GRID_CODECS: tuple[tuple[str, float], ...] = (("raw32", 0.01), ("int8-block", 0.01),
                                              ("topk", 0.1))
RUN_H, RUN_DEADLINE_S, RUN_QUORUM = 50, 60.0, 1  # server.config.RunConfig's defaults
# the run's outer step: plain averaging, what mlp-digits needs (bench.vs_ddp: the default
# Nesterov 0.7 / 0.9 lags DDP by 4x on this model); the same for every run compared
OUTER = OuterConfig(lr=1.0, momentum=0.0)
N_SHARDS = 8  # the run default: nodes share shards round-robin (server.store.shard_for)


@dataclass
class Node:
    index: int
    kind: str
    step_s: float
    down: float  # bytes/s
    up: float  # bytes/s
    latency_s: float
    sampler: BatchSampler | None = None
    opt_state: tuple[np.ndarray, np.ndarray, float] | None = None
    residual: Any = None
    codec_state: Any = None
    ready_at: float = 0.0  # virtual time it is free to take the next RoundOpen

    @property
    def node_id(self) -> str:
        return f"{self.index:02x}" * 32


@dataclass
class Result:
    name: str
    config: dict[str, Any]
    curve: list[tuple[float, float]] = field(default_factory=list)  # (virtual s, eval loss)
    rounds: int = 0
    steps: int = 0
    decisions: int = 0
    changes: list[str] = field(default_factory=list)

    def time_to(self, target: float) -> float | None:
        return next((t for t, loss in self.curve if loss <= target), None)

    @property
    def final_loss(self) -> float:
        """The eval loss of the model the run holds at the horizon (its last commit)."""
        return self.curve[-1][1]

    @property
    def best_loss(self) -> float:
        """The best eval loss of its commits by the horizon (a kept best checkpoint)."""
        return min(loss for _, loss in self.curve)


def population(kinds: Sequence[tuple[str, int, float, float, float, float]]) -> list[Node]:
    nodes: list[Node] = []
    for kind, count, step_s, down, up, lat in kinds:
        for _ in range(count):
            nodes.append(Node(index=len(nodes), kind=kind, step_s=step_s, down=down * MBIT,
                              up=up * MBIT, latency_s=lat))
    return nodes


class World:
    """The run's workload, shards and evaluation (shared by every simulated run)."""

    def __init__(self, seed: int) -> None:
        self.work: Workload = resolve(model="mlp-digits", flavour=None, data=None,
                                      data_path=None, partition="iid", alpha=0.5, seed=seed)
        self.seed = seed
        self.theta0 = initial_params(self.work).astype(np.float32)
        self.n = int(self.theta0.size)
        self.eval_model = self.work.new_model()
        ds = self.work.dataset
        self.x_val = torch.from_numpy(np.ascontiguousarray(ds.x_val)).to(torch.float32)
        self.y_val = torch.from_numpy(np.ascontiguousarray(ds.y_val))

    def shards(self, nodes: list[Node]) -> None:
        ds = self.work.dataset
        owner = assign_shards(ds.keys_train, n_shards=min(N_SHARDS, len(nodes)),
                              partition="iid", alpha=0.5, seed=self.seed)
        for node in nodes:
            idx = np.flatnonzero(owner == node.index % min(N_SHARDS, len(nodes)))
            idx = idx.astype(np.int64)
            node.sampler = BatchSampler(ds.x_train, ds.y_train, idx, batch_size=32,
                                        seed=self.seed * 1000 + node.index)
            node.opt_state = node.residual = node.codec_state = None

    def evaluate(self, theta: np.ndarray) -> float:
        load_flat(self.eval_model, theta)
        self.eval_model.eval()
        with torch.no_grad():
            return float(loss_fn(self.eval_model(self.x_val), self.y_val))


def simulate(world: World, nodes: list[Node], *, horizon_s: float, target: float,
             fixed: tuple[int, tuple[str, float]] | None, name: str,
             weights: str = "steps") -> Result:
    """One run until `horizon_s` virtual seconds: `fixed` (H, codec) or autotune (None).
    Only rounds that commit by the horizon count (the one in flight then is dropped)."""
    world.shards(nodes)
    trainer = SharedTrainer(world.work, keep_opt_state=True)
    theta, momentum = world.theta0.copy(), np.zeros_like(world.theta0)
    outer = OUTER
    by_steps = weights == "steps"  # run config autotune_weights
    tuner = None if fixed is not None else Autotuner(Limits(
        inner_steps=RUN_H, quorum=RUN_QUORUM, deadline_s=RUN_DEADLINE_S, max_steps=10 * RUN_H))
    res = Result(name=name, config={} if fixed is None else
                 {"H": fixed[0], "codec": codec_label(*fixed[1])})
    res.curve.append((0.0, world.evaluate(theta)))
    print(f"  {name} ...", file=sys.stderr, flush=True)
    t, degraded = 0.0, False
    late: list[tuple[float, NodeSample]] = []  # updates after their round closed: timed on arrival
    while t < horizon_s:
        if not degraded and t >= DEGRADE_AT * horizon_s:
            tab = next((n for n in nodes if n.kind == "tab"), None)
            if tab is not None:
                tab.down, tab.up = tab.down / 10, tab.up / 10
            degraded = True
        settings = tuner.settings if tuner is not None else None
        arrivals: list[tuple[float, Node, np.ndarray, int, int, float, int]] = []
        down_bytes = 4 * world.n + FRAME_OVERHEAD
        round_steps = 0
        for node in nodes:
            if fixed is not None:
                max_steps, budget, codec = fixed[0], None, fixed[1]
            else:
                assert settings is not None
                max_steps, budget = settings.max_steps, settings.budget_s
                codec = settings.codec_for(node.node_id, ("raw32", 0.01))
            steps = 0
            while continue_training(done=steps, max_steps=max_steps,
                                    elapsed_s=steps * node.step_s, budget_s=budget):
                steps += 1
            delta, _, _, _ = trainer.train(node, theta, steps=steps, lr=1e-2)
            c = make_codec(codec[0], fraction=codec[1]) if codec[0] == "topk" \
                else make_codec(codec[0])
            payload, node.residual, node.codec_state = encode_update(
                c, delta, residual=node.residual, state=node.codec_state,
                error_feedback=True, layout=world.work.manifest)
            vec = np.asarray(decode_update(payload, world.n, expect=c.name), dtype=np.float32)
            up_bytes = len(payload) + FRAME_OVERHEAD
            start = max(t, node.ready_at)
            got = start + node.latency_s + down_bytes / node.down
            done = got + steps * node.step_s
            arrive = done + node.latency_s + up_bytes / node.up
            arrivals.append((arrive, node, vec, steps, up_bytes, steps * node.step_s,
                             down_bytes))
            round_steps += steps
        arrivals.sort(key=lambda a: (a[0], a[1].index))
        deadline = t + (settings.deadline_s if settings is not None else RUN_DEADLINE_S)
        quorum = settings.quorum if settings is not None else RUN_QUORUM
        taken = [a for a in arrivals if a[0] <= deadline]
        if len(taken) < quorum:
            taken = arrivals[:quorum]
        # every update in: commit at once; else at the deadline (or the quorum-th update)
        close = (arrivals[-1][0] if len(taken) == len(arrivals)
                 else max(deadline, taken[-1][0]))
        kept = {a[1].index for a in taken}
        for a in arrivals:  # a node whose update missed the deadline is still busy with it
            a[1].ready_at = 0.0 if a[1].index in kept else a[0]
        step_counts = np.array([a[3] for a in taken], dtype=np.float64)
        # the server's mean: weighted by steps under autotune (server.reduction)
        agg = np.average(np.stack([a[2] for a in taken]).astype(np.float64), axis=0,
                         weights=step_counts if fixed is None and by_steps else None
                         ).astype(np.float32)
        theta, momentum = outer_step(theta, agg, momentum, outer)
        theta = np.asarray(theta, dtype=np.float32)
        momentum = np.asarray(momentum, dtype=np.float32)
        t_commit = close + SERVER_S
        if t_commit > horizon_s:  # past the horizon: not part of this run's figures
            break
        res.steps += round_steps
        loss = world.evaluate(theta)
        res.curve.append((t_commit, loss))
        if tuner is not None:
            def sample(a: tuple[float, Node, np.ndarray, int, int, float, int], t0: float,
                       is_late: bool) -> NodeSample:
                return NodeSample(node_id=a[1].node_id, runtime="browser" if a[1].kind == "tab"
                                  else "native", steps=a[3], compute_s=a[5],
                                  round_trip_s=a[0] - t0, bytes_down=a[6], bytes_up=a[4],
                                  late=is_late)

            late += [(a[0], sample(a, t, True)) for a in arrivals if a[1].index not in kept]
            samples = [sample(a, t, False) for a in taken]
            samples += [x for at, x in late if at <= t_commit]  # the late ones in by now
            late = [(at, x) for at, x in late if at > t_commit]
            norm = float(np.linalg.norm(agg))
            decision = tuner.decide(samples, RoundSample(
                round=res.rounds, duration_s=t_commit - t, eval_loss=loss, floor=None,
                aggregate_norm=norm, n_active=len(nodes), n_params=world.n))
            res.decisions += 1
            res.changes += [f"r{res.rounds + 1} t={t_commit:.1f}s: {c['reason']}"
                            for c in decision.changes]
        res.rounds += 1
        t = t_commit
    return res


def main(argv: list[str] | None = None) -> int:
    from bench.common import emit, print_table

    p = argparse.ArgumentParser(prog="python -m bench.autotune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--horizon-s", type=float, default=10.0, help="virtual seconds per run")
    p.add_argument("--target", type=float, default=0.2, help="target eval loss (nats)")
    p.add_argument("--seed", type=int, default=0,
                   help="the data split, initial parameters and batch order")
    p.add_argument("--population", default="mixed", choices=sorted(POPULATIONS),
                   help="mixed: the issue's population (default); tab-heavy: the same device "
                        "figures, 1 fast box, 3 slow boxes, 12 tabs")
    p.add_argument("--quick", action="store_true", help="a 2-config grid (smoke test only)")
    p.add_argument("--weights", default="steps", choices=["steps", "equal"],
                   help="autotune's mean: by steps (run config autotune_weights, the default) "
                        "or equal (an ablation)")
    p.add_argument("--show-changes", type=int, default=12, help="autotune changes printed")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    world = World(args.seed)
    kinds = POPULATIONS[args.population]
    nodes = population(kinds)
    grid = [(h, c) for h in GRID_H for c in GRID_CODECS]
    if args.quick:
        grid = grid[:2]
    results: list[Result] = []
    auto = simulate(world, nodes, horizon_s=args.horizon_s, target=args.target, fixed=None,
                    name="auto", weights=args.weights)
    for h, c in grid:
        results.append(simulate(world, population(kinds), horizon_s=args.horizon_s,
                                target=args.target, fixed=(h, c),
                                name=f"H {h}, {codec_label(*c)}"))
    singles: dict[str, Result] = {}
    for kind, _, step_s, down, up, lat in kinds:
        singles[kind] = simulate(world, population([(kind, 1, step_s, down, up, lat)]),
                                 horizon_s=args.horizon_s, target=args.target,
                                 fixed=(RUN_H, ("raw32", 0.01)), name=f"one {kind}")

    def key(r: Result) -> tuple[float, float]:
        ttt = r.time_to(args.target)
        return (ttt if ttt is not None else math.inf, r.final_loss)

    best = min(results, key=key)
    lowest = min(results, key=lambda r: r.final_loss)  # a stricter reference than `best`
    rows = [{"run": r.name, "time_to_target_s": r.time_to(args.target), "final_loss":
             round(r.final_loss, 4), "best_loss": round(r.best_loss, 4), "rounds": r.rounds,
             "inner_steps": r.steps}
            for r in [auto, *results, *singles.values()]]
    print(f"mlp-digits, {len(nodes)} participants ({args.population}), seed {args.seed}, "
          f"horizon {args.horizon_s:g} virtual s, target eval loss {args.target}; rounds "
          f"committed by the horizon only")
    print_table(rows, ["run", "time_to_target_s", "final_loss", "best_loss", "rounds",
                       "inner_steps"])
    print(f"autotune: {auto.decisions} decisions, {len(auto.changes)} changes; the first:")
    for line in auto.changes[:args.show_changes]:
        print("  " + line)

    def ttt(r: Result) -> float | None:
        v = r.time_to(args.target)
        return round(v, 3) if v is not None else None

    def speedup(single: Result) -> float | None:
        a, s = auto.time_to(args.target), single.time_to(args.target)
        if a is None:
            return None
        return round(s / a, 3) if s is not None else None

    emit({"population": {kind: {"count": n, "step_ms": step * 1000, "down_mbit_s": down,
                                "up_mbit_s": up, "latency_ms": lat * 1000}
                         for kind, n, step, down, up, lat in kinds}
          | {"degrading_link": f"one tab 10x slower both ways after {DEGRADE_AT:.0%} of "
                               f"the horizon"},
          "population_name": args.population, "seed": args.seed,
          "model": "mlp-digits", "horizon_s": args.horizon_s, "target_loss": args.target,
          "auto_weights": args.weights,
          "final_loss_rule": "eval loss of the last model each run committed by the horizon "
                             "(a round in flight at the horizon does not count); best_loss: "
                             "the best eval loss among those commits; the same for every run",
          "auto": {"time_to_target_s": ttt(auto), "final_loss": round(auto.final_loss, 4),
                   "best_loss": round(auto.best_loss, 4),
                   "decisions": auto.decisions, "changes": len(auto.changes)},
          "best_fixed": {"config": best.config, "time_to_target_s": ttt(best),
                         "final_loss": round(best.final_loss, 4),
                         "best_loss": round(best.best_loss, 4)},
          "lowest_fixed_final_loss": {"config": lowest.config,
                                      "final_loss": round(lowest.final_loss, 4)},
          "grid_size": len(grid),
          "targets": {"no_later_than_best_fixed": ttt(auto) is not None and (
              ttt(best) is None or (ttt(auto) or 0) <= (ttt(best) or 0)),
              "final_loss_within_1pct": auto.final_loss <= 1.01 * best.final_loss,
              "final_loss_within_1pct_of_lowest_fixed":
                  auto.final_loss <= 1.01 * lowest.final_loss,
              "final_loss_gap": round(auto.final_loss / best.final_loss - 1, 4),
              "best_loss_gap": round(auto.best_loss / best.best_loss - 1, 4)},
          "speedup_vs_one_node": speedup(singles["fast box"]),
          "speedup_vs_one_node_by_kind": {k: speedup(r) for k, r in singles.items()},
          "one_node_time_to_target_s": {k: ttt(r) for k, r in singles.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
