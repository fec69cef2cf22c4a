"""Ray engine for bench.simulate: the simulated participants spread over Ray workers.

    python -m bench.simulate --engine ray --nodes 10000 --rounds 3 --model mlp-digits \
        [--workers N] [--ray-address HOST:PORT]

The driver process holds the REAL coordinator (server.coordinator.Coordinator over a real
server.runstate run, as the asyncio engine does). Each Ray worker is an actor that owns a
slice of the participants: their ML-DSA-65 identities (generated in the worker), one
shared.participant.Participant each (the class native nodes and browser tabs drive, through
bench.sim_nodes.SimNode), the workload rebuilt from the run's model config and data spec, and
one bench.sim_nodes.SharedTrainer. Frames travel as bytes: the coordinator's sends land in a
per-worker outbox that the driver ships to the worker in batches (`deliver`); the worker's
participants verify them and answer (Hello, signed Submits) as they would on a socket, and the
driver feeds the answers to `coordinator.handle_frame`. Training and signing run in the
workers in parallel; verification, aggregation, the outer step and commits in the driver.

Without --ray-address Ray starts locally (--workers CPUs); with it, `ray.init(address=...)`
joins a cluster whose nodes have this project installed (`pip install daa-prime[sim]`).
Refused here: attacks computed from other nodes' updates (ALIE, IPM), secure aggregation.
Peak memory: the summed resident sets of the driver and all it started (bench.proctree).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.proctree import PeakSampler
from bench.scratch import scratch
from bench.sim_nodes import AGENT, SharedTrainer, SimNode
from bench.sim_report import _round_text, accuracy, peak_rss_mb, round_row
from bench.simulate import _keep_opt_state, _local_update, sim_shards
from ml.data import BatchSampler, DataSpec, assign_shards
from ml.workload import from_spec
from server.coordinator import Coordinator
from server.peers import Connection
from server.runstate import open_run
from shared.attacks import get_attack
from shared.envelope import Identity
from shared.participant import Participant

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


def ray_missing() -> str | None:
    """Why the Ray engine cannot run here, or None."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install 'daa-prime[sim]')"
    return None


# -- the worker: a slice of participants ------------------------------------------------------
class SliceWorker:
    """One Ray actor's participants (wrapped with ray.remote at run time: ray stays optional)."""

    def __init__(self, *, indices: list[int], byzantine: list[int], model_cfg: dict[str, Any],
                 spec: dict[str, Any], n_shards: int, batch_size: int, seed: int,
                 keep_opt_state: bool, attack: str, attack_params: dict[str, Any],
                 n_total: int, n_byz: int) -> None:
        torch.set_num_threads(1)
        self.work = from_spec(model_cfg, DataSpec.from_dict(spec))
        byz = set(byzantine)
        self.nodes = {i: SimNode(index=i, byzantine=i in byz, part=Participant(
            Identity.generate(), runtime="native", agent=AGENT, device="cpu")) for i in indices}
        ds, dspec = self.work.dataset, self.work.data_spec
        owner = assign_shards(ds.keys_train, n_shards=n_shards, partition=dspec.partition,
                              alpha=dspec.alpha, seed=dspec.seed)
        self.by_shard = np.argsort(owner, kind="stable")
        self.starts = np.searchsorted(owner[self.by_shard], np.arange(n_shards + 1))
        self.batch_size, self.seed = batch_size, seed
        self.trainer = SharedTrainer(self.work, keep_opt_state=keep_opt_state)
        self.spec, self.attack_params = get_attack(attack), attack_params
        self.n_total, self.n_byz = n_total, n_byz
        self.todo: list[SimNode] = []
        self.todo_round = -1

    def ready(self) -> int:
        return len(self.nodes)

    def _setup(self, node: SimNode) -> None:
        assert node.welcome is not None
        node.part.set_layout(self.work.manifest)  # raises unless it hashes to the run's model
        shard = int(node.welcome["shard"])
        idx = np.sort(self.by_shard[self.starts[shard]:self.starts[shard + 1]]).astype(np.int64)
        ds = self.work.dataset
        node.sampler = BatchSampler(ds.x_train, ds.y_train, idx, batch_size=self.batch_size,
                                    seed=int.from_bytes(hashlib.sha256(
                                        f"{self.seed}:{node.index}".encode()).digest()[:4],
                                        "little"))

    def deliver(self, frames: list[tuple[int, bytes]]
                ) -> tuple[list[tuple[int, bytes]], list[tuple[int, int, bool, int]]]:
        """Server frames -> (frames the participants answer with, per touched node:
        (index, open round or -1, final, errors))."""
        touched: dict[int, SimNode] = {}
        for i, data in frames:
            node = self.nodes[i]
            node.inbox.append(data)
            touched[i] = node
        replies: list[tuple[int, bytes]] = []
        for i, node in touched.items():
            reply = node.pump()
            if reply is not None:
                replies.append((i, reply))
            if node.welcome is not None and node.sampler is None:
                self._setup(node)
        status = [(i, int(n.open["round"]) if n.open is not None else -1, n.final,
                   len(n.errors)) for i, n in touched.items()]
        return replies, status

    def train(self, round_: int, chunk: int) -> tuple[list[tuple[int, bytes]], float, float]:
        """Train and sign up to `chunk` of this worker's nodes open for `round_` -> (their
        Submit frames, train s, sign s); an empty list when all have submitted."""
        if self.todo_round != round_:
            self.todo_round = round_
            self.todo = [n for n in self.nodes.values()
                         if n.open is not None and n.open["round"] == round_]
        batch, self.todo = self.todo[:chunk], self.todo[chunk:]
        out: list[tuple[int, bytes]] = []
        train_s = sign_s = 0.0
        for node in batch:
            (delta, loss, samples, compute_s), took = _local_update(
                self.trainer, node, self.spec, self.work.n_params)
            train_s += took
            if node.byzantine:
                delta = np.asarray(self.spec.apply(
                    own=delta, honest=[], n=self.n_total, f=self.n_byz,
                    seed=self.seed * 1_000_003 + round_ * 10_007 + node.index,
                    **self.attack_params), dtype=np.float32)
            t0 = time.perf_counter()
            frame = node.submit(delta, train_loss=loss, samples=samples, compute_s=compute_s)
            if frame is None:  # it waits for SecAgg keys: stages this engine does not carry
                raise RuntimeError("secure aggregation runs on the asyncio engine only")
            out.append((node.index, frame))
            sign_s += time.perf_counter() - t0
        return out, train_s, sign_s

    def stats(self) -> dict[str, Any]:
        return {"peak_rss_mb": round(peak_rss_mb(), 1),
                "errors": [e for n in self.nodes.values() for e in n.errors][:5]}


class OutboxSender:
    """server.peers.Sender: the coordinator's bytes for node `index` queue for its worker."""

    def __init__(self, box: list[tuple[int, bytes]], index: int, wake: asyncio.Event) -> None:
        self.box, self.index, self.wake, self.closed = box, index, wake, False

    async def send_bytes(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionError("simulated connection is closed")
        self.box.append((self.index, data))
        self.wake.set()

    async def close(self) -> None:
        self.closed = True


def _fut(ref: Any) -> asyncio.Future[Any]:
    return asyncio.wrap_future(ref.future())


class Swarm:
    """The driver's view of the workers: outboxes, node states, flushing."""

    def __init__(self, actors: list[Any], owner: list[int], nodes: int) -> None:
        self.actors, self.owner = actors, owner
        self.boxes: list[list[tuple[int, bytes]]] = [[] for _ in actors]
        self.open = np.full(nodes, -1, dtype=np.int64)
        self.final = np.zeros(nodes, dtype=bool)
        self.errors = np.zeros(nodes, dtype=np.int64)
        self.wake = asyncio.Event()

    async def flush(self) -> list[tuple[int, bytes]]:
        """Ship every queued frame to its worker; the participants' answers."""
        refs = []
        for w, box in enumerate(self.boxes):
            if box:
                items = box[:]
                box.clear()
                refs.append(_fut(self.actors[w].deliver.remote(items)))
        replies: list[tuple[int, bytes]] = []
        for rep, status in await asyncio.gather(*refs):
            replies += rep
            for i, open_round, final, errors in status:
                self.open[i], self.final[i], self.errors[i] = open_round, final, errors
        return replies

    async def until(self, cond: Callable[[], bool], task: asyncio.Task[Any], timeout: float,
                    what: str) -> None:
        """Flush until `cond()`; fail after `timeout` s with nothing delivered (the driver
        signs one frame per node for a broadcast: 10,000 of them take minutes)."""
        deadline = time.monotonic() + timeout
        while True:
            self.wake.clear()
            if any(self.boxes):
                deadline = time.monotonic() + timeout
            await self.flush()
            if cond():
                return
            if task.done():
                task.result()
                if not cond():
                    raise RuntimeError(f"the coordinator stopped while waiting for {what}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out waiting for {what}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=min(left, 1.0))


def _all_open(swarm: Swarm, round_: int) -> bool:
    return bool((swarm.open == round_).all())


def _committed(records: list[dict[str, Any]], round_: int) -> bool:
    return bool(records) and records[-1]["round"] >= round_


def _start_ray(workers: int, address: str | None) -> Any:
    import ray

    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=True)
    return ray


async def simulate_ray(*, nodes: int, rounds: int, byzantine: float = 0.0,
                       attack: str = "sign-flip", aggregator: str = "median",
                       model: str = "mlp-digits", seed: int = 0, inner_steps: int | None = None,
                       partition: str = "iid", data_dir: str | Path | None = None,
                       attack_params: dict[str, Any] | None = None, opt_state: str = "auto",
                       opt_state_mb: float = 256.0, progress: bool = True,
                       extra_config: dict[str, Any] | None = None, workers: int | None = None,
                       address: str | None = None, chunk: int = 32,
                       result_codec: str | None = None) -> dict[str, Any]:
    """bench.simulate.simulate on Ray workers; returns {"rounds": [...], "summary": {...}}."""
    if nodes < 1 or rounds < 1:
        raise ValueError("need --nodes >= 1 and --rounds >= 1")
    if result_codec is not None:
        raise ValueError("--p2p-results runs on the asyncio engine only")
    spec = get_attack(attack)
    n_byz = math.floor(round(nodes * byzantine, 9))
    if n_byz and not spec.uses_own:
        raise ValueError(f"attack {attack!r} needs every honest update in one place; the ray "
                         "engine runs only attacks computed from the attacker's own update")
    workers = max(1, min(workers or os.cpu_count() or 1, nodes))
    ray = _start_ray(workers, address)
    try:
        with PeakSampler(os.getpid()) as mem:  # its last sample while the workers still live
            out = await _drive(ray, nodes=nodes, rounds=rounds, byzantine=byzantine,
                               n_byz=n_byz, attack=attack, aggregator=aggregator, model=model,
                               seed=seed, inner_steps=inner_steps, partition=partition,
                               data_dir=data_dir, attack_params=attack_params or {},
                               opt_state=opt_state, opt_state_mb=opt_state_mb,
                               progress=progress, extra_config=extra_config or {},
                               workers=workers, chunk=chunk)
    finally:
        ray.shutdown()
    out["summary"]["peak_rss_mb"] = round(mem.peak, 1)
    return out


async def _drive(ray: Any, *, nodes: int, rounds: int, byzantine: float, n_byz: int,
                 attack: str, aggregator: str, model: str, seed: int, inner_steps: int | None,
                 partition: str, data_dir: str | Path | None, attack_params: dict[str, Any],
                 opt_state: str, opt_state_mb: float, progress: bool,
                 extra_config: dict[str, Any], workers: int, chunk: int) -> dict[str, Any]:
    t_start = time.perf_counter()

    def say(text: str, *, end: str = "\n") -> None:
        if progress:
            print(text, end=end, file=sys.stderr, flush=True)

    tmp = Path(data_dir) if data_dir is not None else scratch("daa-sim-")
    config = {"model": model, "aggregator": aggregator, "byzantine_fraction": byzantine,
              "quorum": nodes, "deadline_s": 1e7, "rounds": rounds, "inner_steps": inner_steps,
              "n_shards": nodes, "partition": partition, "seed": seed, **extra_config}
    config["n_shards"] = await asyncio.to_thread(sim_shards, config)
    run = await asyncio.to_thread(open_run, tmp / "run", config)
    work, cfg = run.work, run.config
    coord = Coordinator(run)
    records: list[dict[str, Any]] = []
    coord.commit_hooks.append(records.append)
    byz_set = set(np.random.default_rng(seed).permutation(nodes)[:n_byz].tolist())
    keep = _keep_opt_state(opt_state, nodes * run.n_params * 8, opt_state_mb)
    slices = [s.tolist() for s in np.array_split(np.arange(nodes), workers)]
    owner = [0] * nodes
    for w, sl in enumerate(slices):
        for i in sl:
            owner[i] = w
    Actor = ray.remote(num_cpus=1)(SliceWorker)
    t0 = time.perf_counter()
    actors = [Actor.remote(indices=sl, byzantine=[i for i in sl if i in byz_set],
                           model_cfg=work.model_config, spec=work.data_spec.to_dict(),
                           n_shards=cfg.n_shards, batch_size=cfg.batch_size, seed=seed,
                           keep_opt_state=keep, attack=attack, attack_params=attack_params,
                           n_total=nodes, n_byz=n_byz) for sl in slices]
    await asyncio.gather(*[_fut(a.ready.remote()) for a in actors])
    keygen_s = time.perf_counter() - t0
    say(f"{nodes} identities on {workers} Ray workers in {keygen_s:.1f} s; {n_byz} byzantine "
        f"({attack}), aggregator {aggregator}, AdamW state "
        f"{'kept per node' if keep else 'fresh per round'}")
    swarm = Swarm(actors, owner, nodes)
    conns = [Connection(ws=OutboxSender(swarm.boxes[owner[i]], i, swarm.wake),
                        remote=f"ray:{owner[i]}:{i}") for i in range(nodes)]
    task = asyncio.create_task(coord.run_rounds())
    try:
        t0 = time.perf_counter()
        for start in range(0, nodes, 256 * workers):  # Challenge -> Hello -> Welcome
            for conn in conns[start:start + 256 * workers]:
                await coord.greet(conn)
            for i, hello in await swarm.flush():
                await coord.handle_frame(conns[i], hello)
            await swarm.flush()
            say(f"  joined {min(nodes, start + 256 * workers)}/{nodes}", end="\r")
        join_s = time.perf_counter() - t0
        say(f"{nodes} nodes joined in {join_s:.1f} s" + " " * 20)
        eval_model = work.new_model()
        is_classify = work.dataset.task == "classify"
        acc0 = accuracy(run, run.params, eval_model) if is_classify else None
        rows: list[dict[str, Any]] = [{"round": "init", "eval_loss": run.eval_loss_init,
                                       "accuracy": acc0}]
        for r in range(rounds):
            await swarm.until(functools.partial(_all_open, swarm, r), task, 600,
                              f"round {r} to open")
            t_round = time.perf_counter()
            acc_before, rej_before = coord.counters["accepted"], sum(coord.rejected.values())
            train_s = sign_s = 0.0
            done = 0
            pending = {_fut(a.train.remote(r, chunk)): w for w, a in enumerate(actors)}
            while pending:
                finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in finished:
                    w = pending.pop(fut)
                    frames, tr, sg = fut.result()
                    if frames:  # the worker trains its next chunk while we verify this one
                        pending[_fut(actors[w].train.remote(r, chunk))] = w
                    train_s += tr
                    t1 = time.perf_counter()
                    for i, frame in frames:
                        await coord.handle_frame(conns[i], frame)
                        swarm.open[i] = -1
                    sign_s += sg + time.perf_counter() - t1
                    done += len(frames)
                say(f"  round {r}: {done}/{nodes} submitted", end="\r")
            await swarm.until(functools.partial(_committed, records, r), task, 600,
                              f"round {r} to commit")
            row = round_row(r, records[-1], run, coord, eval_model if is_classify else None,
                            acc_before, rej_before, train_s, sign_s, t_round)
            rows.append(row)
            say(_round_text(row, train_s, sign_s))
        await swarm.until(lambda: bool(swarm.final.all()), task, 600, "the final commit")
        await asyncio.wait_for(task, timeout=600)
        for conn in conns:
            coord.disconnect(conn)
        stats = await asyncio.gather(*[_fut(a.stats.remote()) for a in actors])
        last = rows[-1]
        summary = {"nodes": nodes, "rounds": len(rows) - 1, "engine": "ray", "workers": workers,
                   "wall_s": round(time.perf_counter() - t_start, 2),
                   "driver_peak_rss_mb": round(peak_rss_mb(), 1),
                   "worker_peak_rss_mb": [s["peak_rss_mb"] for s in stats],
                   "final_eval_loss": last["eval_loss"], "final_accuracy": last["accuracy"],
                   "initial_eval_loss": run.eval_loss_init, "initial_accuracy": acc0,
                   "attack": attack, "aggregator": aggregator, "byzantine": n_byz,
                   "byzantine_fraction": byzantine, "inner_steps": cfg.inner_steps,
                   "opt_state": "kept" if keep else "fresh", "keygen_s": round(keygen_s, 2),
                   "join_s": round(join_s, 2), "node_errors": int(swarm.errors.sum()),
                   "rejected": dict(coord.rejected), "data_dir": str(tmp)}
        return {"rounds": rows, "summary": summary}
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
