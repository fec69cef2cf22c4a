"""In-process swarm simulator: N honest and Byzantine nodes against the REAL coordinator.

    python -m bench.simulate --nodes 1000 --byzantine 0.2 --attack alie --aggregator median \
        --model mlp-digits --rounds 3 [--seed 0] [--inner-steps 20] [--partition iid]

One process, one event loop, no sockets: the real `server.coordinator.Coordinator` over a real
`server.runstate` run (SQLite + safetensors in a temp data dir) talks to simulated nodes
through an in-memory `Sender` (server.peers) whose `send_bytes` drops the bytes in the node's
inbox. Every node drives shared.participant.Participant, the same class native nodes and
browser tabs drive: it verifies every server frame (shared.trust), answers the Challenge with
a Hello signed by the node's own ML-DSA-65 key, hands over each round's params, and encodes
(codec + error feedback + worker momentum) and signs the Submit that goes through
`coordinator.handle_frame`. Signatures, replay checks, codecs, aggregation, the outer step
and commits are the production code paths.

Memory: nodes hold no torch model. ONE shared model is re-loaded with theta for each node
and trained sequentially (the inner loop of native_node.trainer.Trainer: AdamW betas
(0.9, 0.95), weight decay 0.01, grad-norm clip 1.0, the node's own seeded BatchSampler over
its own shard). Per-node AdamW moments are kept between rounds as flat float32 arrays when
that costs at most --opt-state-mb (as the real Trainer keeps its optimizer); otherwise a
fresh AdamW per node per round (`--opt-state fresh` forces it). The run says which.

torch runs with one intra-op thread (--torch-threads 1, the default): for models this
small that trains about twice as fast as two threads on a 2-core machine.

Byzantine nodes (floor(nodes * byzantine), chosen by --seed) first let every honest node
train and submit, then compute their update with shared.attacks (ALIE and IPM from the
round's honest updates; sign-flip, scaled and gaussian from their own trained update;
label-flip trains on labels y -> C-1-y).

Prints a progress line per round, a table, and as the LAST line JSON with nodes, rounds,
wall_s, peak_rss_mb, final_eval_loss, final_accuracy, attack, aggregator, byzantine (+engine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.scratch import scratch
from bench.sim_nodes import (
    SharedTrainer,
    SimNode,
    join,
    pump_until,
    run_ahead,
    sim_participant,
    sim_summary,
    train_merged,
)
from bench.sim_report import _round_text, accuracy, peak_rss_mb, round_row
from ml.data import BatchSampler, assign_shards
from server.config import RunConfig
from server.coordinator import Coordinator
from server.reduction import ServerReduction
from server.runstate import open_run, workload_of
from shared.attacks import ATTACKS, Attack, get_attack
from shared.envelope import Identity
from shared.messages import RESULT_CODECS
from shared.p2p import decode_result, encode_result

log = logging.getLogger("bench.simulate")


def _round_through_codec(coord: Coordinator, result_codec: str) -> None:
    """Every aggregate goes through `result_codec` before the outer step, as in a `p2p` run
    whose owners send reduced shards in it."""
    reduction = coord.reduction
    assert isinstance(reduction, ServerReduction)  # the simulator submits (transport ws)
    exact = reduction.aggregate

    def as_p2p_results(vectors: list[np.ndarray], round_: int) -> np.ndarray:
        agg = exact(vectors, round_)
        return np.asarray(decode_result(encode_result(agg, result_codec), agg.size,
                                        result_codec), dtype=np.float32)

    reduction.aggregate = as_p2p_results  # type: ignore[method-assign]


def _local_update(trainer: SharedTrainer, node: SimNode, spec: Attack, n_params: int
                  ) -> tuple[tuple[np.ndarray, float | None, int, float], float]:
    """The node's trained update (delta, loss, samples, compute s) and the seconds it took;
    zeros for an attacker whose attack does not start from its own update."""
    job = node.open
    assert job is not None
    if node.byzantine and not spec.uses_own:
        return (np.zeros(n_params, np.float32), None, 0, 0.0), 0.0
    theta = node.theta()
    t0 = time.perf_counter()
    round_ = int(job["round"])
    if job.get("merge") and node.ahead is not None:  # overlap: steps run ahead are this round's
        return train_merged(trainer, node, theta, round_=round_, lr=job["lr"]), \
            time.perf_counter() - t0
    node.ahead = None  # none ran ahead, or not for this round: dropped
    result = trainer.train(node, theta, steps=job["steps"], lr=job["lr"],
                           poison_labels=node.byzantine and spec.kind == "data",
                           keep_going=lambda done, elapsed: node.part.keep_training(
                               round_, done, elapsed))
    return result, time.perf_counter() - t0


def _keep_opt_state(opt_state: str, total_bytes: int, opt_state_mb: float) -> bool:
    """Whether every node keeps its AdamW state between rounds ("auto": if it fits)."""
    return opt_state == "keep" or (opt_state == "auto"
                                   and total_bytes <= opt_state_mb * 1024 * 1024)


def outer_config(outer: str | None, overlap: bool) -> dict[str, Any]:
    """Run config for --outer and --overlap (SparseLoCo: its nodes' 4% int2 top-k, lr 1)."""
    cfg: dict[str, Any] = {"overlap": True} if overlap else {}
    if outer == "sparseloco":
        cfg |= {"outer_lr": 1.0, "codec": "topk",
                "codec_params": {"fraction": 0.04, "values": "int2"}}
    return cfg | ({"outer": outer} if outer else {})


def sim_shards(config: dict[str, Any]) -> int:
    """One shard a node, or one a training row when nodes outnumber rows (10,000 nodes on the
    1,437 rows of digits: nodes then share shards, as the server hands them out round-robin)."""
    cfg = RunConfig.from_dict({}).merged(config, resuming=False)  # as open_run reads it
    rows = len(workload_of(cfg).dataset.keys_train)
    return min(int(config["n_shards"]), rows)


async def simulate(*, nodes: int, rounds: int, byzantine: float, attack: str, aggregator: str,
                   model: str = "mlp-digits", seed: int = 0, inner_steps: int | None = None,
                   partition: str = "iid", data_dir: str | Path | None = None,
                   attack_params: dict[str, Any] | None = None, opt_state: str = "auto",
                   opt_state_mb: float = 256.0, progress: bool = True,
                   extra_config: dict[str, Any] | None = None,
                   result_codec: str | None = None, outer: str | None = None,
                   overlap: bool = False, ahead_steps: int | None = None) -> dict[str, Any]:
    """Run the simulation; returns {"rounds": [per-round rows], "summary": {...}}.
    `result_codec`: every aggregate goes through that codec before the outer step, as in a
    `p2p` run whose owners send reduced shards in it (shared.p2p.encode_result).
    `outer` "sparseloco": SparseLoCo's run (4% int2 top-k up, outer lr 1, unless
    extra_config says otherwise); the nodes apply its sparse RoundOpens. `overlap`: the run
    option; right after its Submit a node trains `ahead_steps` (default H // 2: the time its
    upload, the aggregation and the downlink take, in steps) of its next round."""
    if nodes < 1 or rounds < 1:
        raise ValueError("need --nodes >= 1 and --rounds >= 1")
    spec = get_attack(attack)
    t_start = time.perf_counter()
    tmp = Path(data_dir) if data_dir is not None else scratch("daa-sim-")
    validating = bool((extra_config or {}).get("validation"))
    # every node submits, so a round commits once all have; with validation some updates
    # are excluded at commit time, and a round keeps going when at least half remain
    quorum = max(1, (nodes + 1) // 2) if validating else nodes
    config = {"model": model, "aggregator": aggregator, "byzantine_fraction": byzantine,
              "quorum": quorum, "deadline_s": 1e7, "rounds": rounds, "inner_steps": inner_steps,
              "n_shards": nodes, "partition": partition, "seed": seed,
              **outer_config(outer, overlap), **(extra_config or {})}
    config["n_shards"] = await asyncio.to_thread(sim_shards, config)
    run = await asyncio.to_thread(open_run, tmp / "run", config)
    work = run.work
    cfg = run.config
    coord = Coordinator(run)
    if result_codec is not None:
        _round_through_codec(coord, result_codec)
    records: list[dict[str, Any]] = []
    coord.commit_hooks.append(records.append)
    n_byz = math.floor(round(nodes * byzantine, 9))
    rng = np.random.default_rng(seed)
    byz_set = set(rng.permutation(nodes)[:n_byz].tolist())
    n_ahead = cfg.inner_steps // 2 if ahead_steps is None else ahead_steps  # overlap
    keep = _keep_opt_state(opt_state, nodes * run.n_params * 8, opt_state_mb)
    trainer = SharedTrainer(work, keep_opt_state=keep)
    ds, dspec = work.dataset, work.data_spec
    owner = assign_shards(ds.keys_train, n_shards=cfg.n_shards, partition=dspec.partition,
                          alpha=dspec.alpha, seed=dspec.seed)  # = shard_indices, computed once
    by_shard = np.argsort(owner, kind="stable")
    starts = np.searchsorted(owner[by_shard], np.arange(cfg.n_shards + 1))
    wake = asyncio.Event()

    def say(text: str, *, end: str = "\n") -> None:
        if progress:
            print(text, end=end, file=sys.stderr, flush=True)

    # -- identities (every node its own ML-DSA-65 key) -------------------------------------
    t0 = time.perf_counter()
    sim: list[SimNode] = [
        SimNode(index=i, byzantine=i in byz_set, part=sim_participant(Identity.generate()))
        for i in range(nodes)]
    keygen_s = time.perf_counter() - t0
    say(f"{nodes} identities in {keygen_s:.1f} s; {n_byz} byzantine ({attack}), "
        f"aggregator {aggregator}, AdamW state {'kept per node' if keep else 'fresh per round'}")

    task = asyncio.create_task(coord.run_rounds())
    try:
        # -- join: Challenge -> Hello -> Welcome (+ the open round) -----------------------------
        t0 = time.perf_counter()
        for node in sim:
            shard = (await join(node, coord, wake, work.manifest))["shard"]
            idx = np.sort(by_shard[starts[shard]:starts[shard + 1]]).astype(np.int64)
            # seeded by (run seed, node index), not the random node id: runs are repeatable
            node.sampler = BatchSampler(ds.x_train, ds.y_train, idx, batch_size=cfg.batch_size,
                                        seed=int.from_bytes(hashlib.sha256(
                                            f"{seed}:{node.index}".encode()).digest()[:4],
                                            "little"))
            if progress and (node.index + 1) % 100 == 0:
                say(f"  joined {node.index + 1}/{nodes}", end="\r")
        join_s = time.perf_counter() - t0
        say(f"{nodes} nodes joined in {join_s:.1f} s" + " " * 20)

        rows: list[dict[str, Any]] = []
        eval_model = work.new_model()
        is_classify = work.dataset.task == "classify"
        acc0 = accuracy(run, run.params, eval_model) if is_classify else None
        rows.append({"round": "init", "eval_loss": run.eval_loss_init, "accuracy": acc0})
        for r in range(rounds):
            await pump_until(wake, lambda r=r: all(n.open is not None and n.open["round"] == r
                                                   for n in sim), sim, task, 600,
                             f"round {r} to open")
            t_round = time.perf_counter()
            acc_before, rej_before = coord.counters["accepted"], sum(coord.rejected.values())
            honest: list[np.ndarray] = []
            keep_honest = not spec.uses_own
            sign_s = train_s = 0.0
            order = [n for n in sim if not n.byzantine] + [n for n in sim if n.byzantine]
            shared_attack: np.ndarray | None = None  # attacks computed from the honest only
            for k, node in enumerate(order):
                assert node.conn is not None
                result, took_s = _local_update(trainer, node, spec, run.n_params)
                train_s += took_s
                delta, train_loss, samples, compute_s = result
                if node.byzantine and shared_attack is not None:
                    delta = shared_attack  # ALIE / IPM: one vector per round, the same for all
                elif node.byzantine:
                    delta = np.asarray(spec.apply(
                        own=delta, honest=honest, n=nodes, f=n_byz,
                        seed=seed * 1_000_003 + r * 10_007 + node.index,
                        **(attack_params or {})), dtype=np.float32)
                    if not spec.uses_own:
                        shared_attack = delta
                elif keep_honest:
                    honest.append(delta)
                t0 = time.perf_counter()
                data = node.submit(delta, train_loss=train_loss, samples=samples,
                                   compute_s=compute_s)
                await node.send_update(data)  # None: sent masked once the secagg keys are in
                sign_s += time.perf_counter() - t0
                node.pump()
                run_ahead(trainer, node, lr=cfg.inner_lr, steps=n_ahead)  # overlap runs
                if progress and (k + 1) % 50 == 0:
                    say(f"  round {r}: {k + 1}/{nodes} submitted", end="\r")
            honest.clear()
            await pump_until(wake, lambda r=r: bool(records) and records[-1]["round"] >= r, sim,
                             task, 600, f"round {r} to commit")
            row = round_row(r, records[-1], run, coord, eval_model if is_classify else None,
                            acc_before, rej_before, train_s, sign_s, t_round)
            rows.append(row)
            say(_round_text(row, train_s, sign_s))
        await asyncio.wait_for(task, timeout=60)
        await pump_until(wake, lambda: all(n.final for n in sim), sim, task, 60, "the final commit")
        list(map(coord.disconnect, [n.conn for n in sim]))  # type: ignore[arg-type]  # leave
        errors = sum(len(n.errors) for n in sim)
        last = rows[-1]
        summary = {"nodes": nodes, "rounds": len(rows) - 1,
                   "wall_s": round(time.perf_counter() - t_start, 2),
                   "peak_rss_mb": round(peak_rss_mb(), 1),
                   "final_eval_loss": last["eval_loss"], "final_accuracy": last["accuracy"],
                   "initial_eval_loss": run.eval_loss_init, "initial_accuracy": acc0,
                   "attack": attack, "aggregator": aggregator, "byzantine": n_byz,
                   "byzantine_fraction": byzantine, "inner_steps": cfg.inner_steps,
                   "opt_state": "kept" if keep else "fresh", "keygen_s": round(keygen_s, 2),
                   "join_s": round(join_s, 2), "node_errors": errors,
                   "rejected": dict(coord.rejected), "data_dir": str(tmp), **sim_summary(sim)}
        return {"rounds": rows, "summary": summary}
    finally:  # an error above must not leave the round loop running (asyncio.run would wait)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _params(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.common import emit, print_table

    p = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--byzantine", type=float, default=0.0, help="fraction of Byzantine nodes")
    p.add_argument("--attack", default="sign-flip", choices=sorted(ATTACKS))
    p.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE",
                   help="attack parameter, e.g. epsilon=0.5 (repeatable)")
    p.add_argument("--aggregator", default="median")
    p.add_argument("--model", default="mlp-digits")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inner-steps", type=int, default=None,
                   help="H inner AdamW steps per round (default: the run config's, 50)")
    p.add_argument("--partition", default="iid", choices=["iid", "noniid"])
    p.add_argument("--opt-state", default="auto", choices=["auto", "keep", "fresh"],
                   help="per-node AdamW moments between rounds (auto: keep if <= "
                        "--opt-state-mb)")
    p.add_argument("--opt-state-mb", type=float, default=256.0)
    p.add_argument("--data-dir", default=None, help="run folder (default: a new temp dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="config",
                   help="run config override, e.g. outer_lr=1 (repeatable; server.config)")
    p.add_argument("--p2p-results", default=None, choices=RESULT_CODECS,
                   help="round every aggregate through this codec, as a p2p run's owners do "
                        "(run config p2p_result_codec): what 16-bit aggregates cost")
    p.add_argument("--outer", default=None, choices=["nesterov", "sparseloco"],
                   help="the outer step; sparseloco: 4%% int2 top-k up, sparse step down")
    p.add_argument("--overlap", action="store_true",
                   help="run option overlap: nodes train ahead while their update is out")
    p.add_argument("--ahead-steps", type=int, default=None,
                   help="steps a node trains ahead under --overlap (default H // 2)")
    p.add_argument("--engine", default="asyncio", choices=["asyncio", "ray"],
                   help="ray: the participants on Ray workers (bench.sim_ray)")
    p.add_argument("--workers", type=int, default=None, help="ray workers (default: CPUs)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads (1 is ~2x faster for these tiny models)")
    args = p.parse_args(argv)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    kw: dict[str, Any] = dict(
        nodes=args.nodes, rounds=args.rounds, byzantine=args.byzantine, attack=args.attack,
        aggregator=args.aggregator, model=args.model, seed=args.seed,
        inner_steps=args.inner_steps, partition=args.partition, data_dir=args.data_dir,
        attack_params=_params(args.attack_param), opt_state=args.opt_state,
        opt_state_mb=args.opt_state_mb, progress=not args.quiet,
        extra_config=_params(args.config) or None)
    if args.engine == "ray":  # an optional dependency (pip install .[sim])
        from bench.sim_ray import simulate_ray
        out = asyncio.run(simulate_ray(**kw, workers=args.workers, address=args.ray_address,
                                       result_codec=args.p2p_results))
    else:
        out = asyncio.run(simulate(**kw, result_codec=args.p2p_results, outer=args.outer,
                                   overlap=args.overlap, ahead_steps=args.ahead_steps))
    s = out["summary"]
    print(f"{s['nodes']} nodes ({s['byzantine']} byzantine, {s['attack']}), aggregator "
          f"{s['aggregator']}, {s['inner_steps']} inner steps, AdamW state {s['opt_state']}; "
          f"run in {s['data_dir']}")
    print_table(out["rounds"], ["round", "eval_loss", "accuracy", "train_loss", "n_updates",
                                "accepted", "rejected", "train_s", "submit_s", "round_s"])
    emit({**{k: s[k] for k in ("nodes", "rounds", "wall_s", "peak_rss_mb", "final_eval_loss",
                               "final_accuracy", "attack", "aggregator", "byzantine")},
          "p2p_results": args.p2p_results,
          **({k: s[k] for k in ("downlink", "ahead_merges", "steps_ahead")}
             if args.outer or args.overlap else {}),
          **({"engine": "ray", "workers": s["workers"]} if args.engine == "ray" else {})})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
