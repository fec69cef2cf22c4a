"""Simulated nodes for bench.simulate: an in-memory Sender, a node that drives the same
shared.participant.Participant as native nodes and browser tabs (so a feature added to the
participant is simulated with no extra code), and one shared torch trainer for all of them."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ml.data import BatchSampler
from ml.inner_opt import InnerAdamW
from ml.workload import Workload
from ml.zoo import flatten, load_flat, loss_fn
from server.peers import Connection
from shared.attacks import flip_labels
from shared.messages import SecAgg
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
        for ev in events:
            frame = self._on_event(ev)
            if frame is not None:
                return frame
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
        delta = (theta.astype(np.float32) - flatten(self.model)).astype(np.float32)
        mean = float(np.mean(losses)) if losses else None
        return delta, (mean if mean is not None and math.isfinite(mean) else None), \
            done * node.sampler.batch_size, compute
