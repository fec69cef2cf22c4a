"""Simulated nodes for bench.simulate: an in-memory Sender, a node that drives the same
shared.participant.Participant as native nodes and browser tabs (so a feature added to the
participant is simulated with no extra code), and one shared torch trainer for all of them.

Like native nodes, a simulated node says `sparse-step` (it applies SparseLoCo's sparse
RoundOpens with numpy; `kinds` counts what its RoundOpens carried) and trains ahead in an
`overlap` run (`Ahead`: steps of round t+1 from its own params right after its Submit of round
t, merged onto theta_{t+1} when that round opens, shared.overlap)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ml.data import BatchSampler
from ml.inner_opt import InnerAdamW
from ml.workload import Workload
from ml.zoo import flatten, load_flat, loss_fn
from server.peers import Connection
from shared.attacks import flip_labels
from shared.envelope import Identity
from shared.messages import SecAgg
from shared.open_kinds import OpenKinds, sparse_features
from shared.overlap import merge
from shared.participant import Event, Participant

log = logging.getLogger("bench.simulate")
AGENT = "daa-prime-sim/0.1"


class Shardholder(Protocol):
    """What the shared trainer needs of a node: its shard's sampler and AdamW moments."""

    sampler: BatchSampler | None
    opt_state: tuple[np.ndarray, np.ndarray, float] | None


class MemorySender:
    """server.peers.Sender over memory: the coordinator's bytes land in the node's inbox."""

    def __init__(self, node: SimNode, wake: asyncio.Event) -> None:
        self.node, self.wake, self.closed = node, wake, False

    async def send_bytes(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionError("simulated connection is closed")
        self.node.inbox.append(data)
        self.wake.set()

    async def close(self) -> None:
        self.closed = True


@dataclass(slots=True)
class Ahead:
    """Steps a node ran ahead of its next round (run option overlap): from `start` (where its
    last round's steps ended) to `end`, `steps` of them."""

    after_round: int
    start: np.ndarray
    end: np.ndarray
    steps: int
    losses: list[float]
    samples: int
    compute_s: float


def sim_participant(identity: Identity) -> Participant:
    """A simulated node's participant: what a native node's says and does (sparse steps,
    training ahead)."""
    part = Participant(identity, runtime="native", agent=AGENT, device="cpu")
    part.extra_features = sparse_features()
    part.ahead.supported = True
    return part


@dataclass(eq=False)
class SimNode:
    index: int
    part: Participant  # the one participant implementation, as in every runtime
    byzantine: bool
    inbox: list[bytes] = field(default_factory=list)
    conn: Connection | None = None
    welcome: Event | None = None  # the participant's "welcome" event
    open: Event | None = None  # the newest "train" event not yet trained for (without params)
    committed: int = -1  # newest round the server told us it committed
    final: bool = False
    acks: int = 0
    errors: list[str] = field(default_factory=list)
    sampler: BatchSampler | None = None
    opt_state: tuple[np.ndarray, np.ndarray, float] | None = None  # exp_avg, exp_avg_sq, step
    # secure aggregation: what the node answers to SecAgg stages (and its masked Submit once
    # they are done), sent by `flush` through `send` (the coordinator's handle_frame)
    outgoing: list[bytes] = field(default_factory=list)
    send: Callable[[bytes], Awaitable[None]] | None = None
    kinds: OpenKinds | None = None  # the RoundOpen kinds it took (and resyncs)
    ahead_after: int | None = None  # overlap: its Submit of this round said "train ahead"
    ahead: Ahead | None = None  # steps run ahead, waiting for their round to open
    steps_ahead: int = 0  # inner steps it ran ahead in all

    def __post_init__(self) -> None:
        self.kinds = OpenKinds.watch(self.part)

    @property
    def node_id(self) -> str:
        return self.part.node_id

    def theta(self) -> np.ndarray:
        """The open round's params: what the participant holds (numpy natively)."""
        return np.asarray(self.part.held, dtype=np.float32)

    def pump(self) -> bytes | None:
        """Feed every queued server frame to the participant and carry out its events; the
        frame to send back (the Hello answering a Challenge), if any."""
        reply: bytes | None = None
        frames, self.inbox = self.inbox, []
        for raw in frames:
            secagg = len(raw) > 5 and raw[5] == SecAgg.TYPE  # the frame's message type
            for ev in self.part.receive(raw):
                out = self._on_event(ev)
                if secagg and out is not None:
                    self.outgoing.append(out)
                else:
                    reply = out or reply
        return reply

    async def send_update(self, data: bytes | None) -> None:
        """Send the update `submit` returned (None: it goes masked with `flush`)."""
        if data is not None and self.send is not None:
            await self.send(data)

    async def flush(self) -> None:
        """Send what the node answered to secure-aggregation stages."""
        frames, self.outgoing = self.outgoing, []
        for data in frames:
            if self.send is not None:
                await self.send(data)

    def _on_event(self, ev: Event) -> bytes | None:
        kind = ev["kind"]
        if kind == "send":
            return bytes(ev["frame"])
        if kind == "welcome":
            self.welcome = ev
        elif kind == "train":  # theta is the participant's own `held` vector: no second copy
            self.open = {k: v for k, v in ev.items() if k != "params"}
        elif kind == "train_ahead":
            self.ahead_after = int(ev["after_round"])
        elif kind == "cancel" and self.open is not None and self.open["round"] == ev["round"]:
            self.open = None
        elif kind == "ack":
            self.acks += 1
        elif kind == "committed":
            self.committed = max(self.committed, ev["round"])
            self.final = self.final or ev["final"]
            if self.open is not None and self.open["round"] <= ev["round"]:
                self.open = None
        elif kind in ("error", "refused", "fatal"):
            self.errors.append(f"{ev.get('code', kind)}: {ev['message']}")
        return None

    def submit(self, delta: np.ndarray, *, train_loss: float | None, samples: int,
               compute_s: float) -> bytes | None:
        """The participant's signed Submit of `delta` for the open round (codec, error
        feedback and worker momentum exactly as every runtime applies them); None when it
        waits for the secure-aggregation keys (then `flush` sends it masked)."""
        assert self.open is not None
        events = self.part.submit(int(self.open["round"]),
                                  np.ascontiguousarray(delta, dtype="<f4").tobytes(),
                                  train_loss=train_loss, samples=samples, compute_s=compute_s)
        self.open = None
        frames = [f for f in map(self._on_event, events) if f is not None]  # + train_ahead
        if frames:
            return frames[0]
        if any(ev["kind"] == "secagg" for ev in events):
            return None
        raise RuntimeError(f"node {self.index} sent no update: {self.errors[-1:]}")


class SharedTrainer:
    """The inner loop of native_node.trainer.Trainer on ONE model shared by every node, with
    its optimizer (ml.inner_opt.InnerAdamW: torch's single-tensor AdamW written out, the same
    arithmetic bit for bit without torch.optim's per-step hooks, ~25% of a step here)."""

    def __init__(self, work: Workload, *, keep_opt_state: bool) -> None:
        self.work = work
        self.model = work.new_model()
        self.params = list(self.model.parameters())
        self.keep = keep_opt_state
        self.last_losses: list[float] = []  # the last `train`'s step losses
        self.last_node: Shardholder | None = None  # ... and whose they were
        # label flipping: y -> C-1-y over the classes, or over the vocabulary for a language model
        self.n_classes = int(work.model_config.get("n_classes", 0)
                             or work.model_config.get("vocab_size", 0) or 0)

    def train(self, node: Shardholder, theta: np.ndarray, *, steps: int, lr: float,
              poison_labels: bool = False,
              keep_going: Callable[[int, float], bool] | None = None
              ) -> tuple[np.ndarray, float | None, int, float]:
        """Inner AdamW steps from theta on the node's shard -> (delta, mean loss, samples,
        seconds): `steps` of them, or while `keep_going(done, elapsed_s)` says so (the
        participant's `keep_training`: a RoundOpen's time budget)."""
        assert node.sampler is not None
        load_flat(self.model, theta)
        opt = InnerAdamW(self.params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)  # fresh
        if self.keep and node.opt_state is not None:  # or the node's own moments
            avg, sq, step = node.opt_state
            off = 0
            for p, m, v in zip(self.params, opt.exp_avg, opt.exp_avg_sq, strict=True):
                n = p.numel()
                m.copy_(torch.from_numpy(avg[off:off + n]).view_as(p))
                v.copy_(torch.from_numpy(sq[off:off + n]).view_as(p))
                off += n
            opt.steps = int(step)
        self.model.train()
        losses: list[float] = []
        t0 = time.perf_counter()
        done = 0
        while (done < steps if keep_going is None
               else keep_going(done, time.perf_counter() - t0)):
            done += 1
            xb, yb = node.sampler.sample()
            if poison_labels:
                yb = flip_labels(yb, self.n_classes)
            x = torch.from_numpy(np.ascontiguousarray(xb))
            y = torch.from_numpy(np.ascontiguousarray(yb))
            loss = loss_fn(self.model(x), y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
        compute = time.perf_counter() - t0
        if self.keep:
            node.opt_state = (
                np.concatenate([m.reshape(-1).numpy() for m in opt.exp_avg]).astype(np.float32),
                np.concatenate([v.reshape(-1).numpy() for v in opt.exp_avg_sq]).astype(np.float32),
                float(opt.steps))
        self.last_losses, self.last_node = losses, node
        delta = (theta.astype(np.float32) - flatten(self.model)).astype(np.float32)
        mean = float(np.mean(losses)) if losses else None
        return delta, (mean if mean is not None and math.isfinite(mean) else None), \
            done * node.sampler.batch_size, compute

    def final(self) -> np.ndarray:
        """The shared model's params: where the last `train` ended (until the next one)."""
        return np.asarray(flatten(self.model), dtype=np.float32)


def run_ahead(trainer: SharedTrainer, node: SimNode, *, steps: int, lr: float) -> None:
    """Overlap (`node.ahead_after`, set by its Submit's events): right after the Submit (the
    shared model still holds where that round's steps ended), `steps` inner steps of its next
    round from there, kept in `node.ahead` until that round opens. An attacker that trained
    nothing runs none."""
    if node.ahead_after is None:  # no overlap, or its Submit did not say so
        return
    if trainer.last_node is not node:  # the model does not hold where its steps ended
        node.ahead_after = None
        return
    start = trainer.final()
    _, _, samples, compute_s = trainer.train(node, start, steps=steps, lr=lr)
    node.ahead = Ahead(after_round=node.ahead_after, start=start, end=trainer.final(),
                       steps=steps, losses=list(trainer.last_losses), samples=samples,
                       compute_s=compute_s)
    node.ahead_after = None
    node.steps_ahead += steps


def train_merged(trainer: SharedTrainer, node: SimNode, theta: np.ndarray, *, round_: int,
                 lr: float) -> tuple[np.ndarray, float | None, int, float]:
    """The round the steps run ahead belong to opened with `theta`: they are moved onto it
    (shared.overlap.merge: theta + (end - start)), the round's remaining steps run from
    there, and the update is the ordinary theta - final. (delta, loss, samples, compute s)."""
    ahead, node.ahead = node.ahead, None
    assert ahead is not None
    local = np.asarray(merge(theta, ahead.end, ahead.start), dtype=np.float32)
    losses, samples, compute_s = list(ahead.losses), ahead.samples, ahead.compute_s
    final = local
    if node.part.keep_training(round_, ahead.steps, 0.0):
        _, _, more, secs = trainer.train(
            node, local, steps=0, lr=lr, keep_going=lambda done, elapsed: node.part
            .keep_training(round_, ahead.steps + done, elapsed))
        final = trainer.final()
        losses += trainer.last_losses
        samples, compute_s = samples + more, compute_s + secs
    mean = float(np.mean(losses)) if losses else None
    return ((theta - final).astype(np.float32),
            mean if mean is not None and math.isfinite(mean) else None, samples, compute_s)


def sim_summary(nodes: list[SimNode]) -> dict[str, object]:
    """The nodes' RoundOpen kinds (and resyncs) summed, and what overlap did: RoundOpens
    merged into steps run ahead, and those steps."""
    kinds: dict[str, int] = {}
    for n in nodes:
        for k, v in (n.kinds.counts if n.kinds is not None else {}).items():
            kinds[k] = kinds.get(k, 0) + v
    return {"downlink": kinds, "ahead_merges": sum(n.part.ahead.merges for n in nodes),
            "steps_ahead": sum(n.steps_ahead for n in nodes)}


async def pump_until(wake: asyncio.Event, cond: Any, nodes: Sequence[SimNode],
                     task: asyncio.Task[Any], timeout: float, what: str) -> None:
    """Pump every node's inbox until `cond()`; fail if the coordinator died or time ran out."""
    deadline = time.monotonic() + timeout
    while True:
        for node in nodes:
            if node.inbox:
                node.pump()
            await node.flush()  # secure aggregation's answers
        if cond():
            return
        if task.done():
            task.result()  # raises the coordinator's error
            if not cond():
                raise RuntimeError(f"the coordinator stopped while waiting for {what}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"timed out waiting for {what}")
        wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=min(left, 1.0))


async def join(node: SimNode, coord: Any, wake: asyncio.Event,
                manifest: Any) -> Event:
    """Challenge -> Hello -> Welcome (+ the open round) for one simulated node; its
    participant's "welcome" event."""
    node.conn = Connection(ws=MemorySender(node, wake), remote=f"sim:{node.index}")
    node.send = functools.partial(coord.handle_frame, node.conn)
    await coord.greet(node.conn)
    hello = node.pump()
    assert hello is not None, "no Challenge from the coordinator"
    await coord.handle_frame(node.conn, hello)
    node.pump()
    if node.welcome is None:
        raise RuntimeError(f"node {node.index} was not welcomed: {node.errors}")
    node.part.set_layout(manifest)  # raises unless it hashes to the run's model
    return node.welcome
