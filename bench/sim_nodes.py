"""Simulated nodes for bench.simulate: an in-memory Sender, a node that speaks the protocol
frame for frame like native_node.client, and one shared torch trainer for all of them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ml.data import BatchSampler
from ml.workload import Workload
from ml.zoo import flatten, load_flat, loss_fn
from native_node.encoder import UpdateEncoder
from native_node.trust import ServerTrust
from server.peers import Connection
from shared.attacks import flip_labels
from shared.codecs import make_codec
from shared.envelope import Identity, new_nonce
from shared.layout import TensorSlot
from shared.messages import (
    Ack,
    Challenge,
    Error,
    Hello,
    RoundCommitted,
    RoundOpen,
    Submit,
    Welcome,
)

log = logging.getLogger("bench.simulate")
AGENT = "daa-prime-sim/0.1"
MAX_MESSAGE = 512 * 1024 * 1024


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
    identity: Identity
    byzantine: bool
    trust: ServerTrust
    layout: Sequence[TensorSlot]  # the run's parameter layout (for per-tensor codecs)
    inbox: list[bytes] = field(default_factory=list)
    conn: Connection | None = None
    challenge: Challenge | None = None
    welcome: Welcome | None = None
    open: RoundOpen | None = None  # the newest RoundOpen not yet trained for
    committed: int = -1  # newest round the server told us it committed
    final: bool = False
    acks: int = 0
    errors: list[str] = field(default_factory=list)
    sampler: BatchSampler | None = None
    opt_state: tuple[np.ndarray, np.ndarray, float] | None = None  # exp_avg, exp_avg_sq, step
    encoder: UpdateEncoder | None = None  # the real node's codec + error-feedback state

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def frame(self, msg: Hello | Submit) -> bytes:
        """Signed exactly as native_node.client.NodeClient._send signs (fresh nonce)."""
        assert self.challenge is not None
        msg = dataclasses.replace(msg, nonce=new_nonce())
        sign = self.identity.signer(run_id=self.challenge.run_id,
                                    round=getattr(msg, "round", -1), msg_type=msg.TYPE,
                                    nonce=msg.nonce)
        return msg.to_frame(sign=sign, compress=isinstance(msg, Submit))

    def pump(self) -> bytes | None:
        """Open every queued server frame (verified by ServerTrust); a Hello to send back
        when a Challenge arrived."""
        reply: bytes | None = None
        frames, self.inbox = self.inbox, []
        for raw in frames:
            msg = self.trust.open(raw)
            if isinstance(msg, Challenge):
                self.challenge = msg
                ident = self.identity
                reply = self.frame(Hello(node_id=ident.node_id,
                                         public_key=ident.public_key.hex(),
                                         challenge=msg.challenge, nonce=new_nonce(),
                                         runtime="native", agent=AGENT, device="cpu"))
            elif isinstance(msg, Welcome):
                self.welcome = msg
                self.encoder = UpdateEncoder(make_codec(msg.codec, **msg.codec_params),
                                             error_feedback=msg.error_feedback,
                                             layout=self.layout,
                                             momentum=msg.worker_momentum)
            elif isinstance(msg, RoundOpen):
                self.open = msg
            elif isinstance(msg, Ack):
                self.acks += 1
            elif isinstance(msg, RoundCommitted):
                self.committed = max(self.committed, msg.round)
                self.final = self.final or msg.final
                if self.open is not None and self.open.round <= msg.round:
                    self.open = None
            elif isinstance(msg, Error):
                self.errors.append(f"{msg.code}: {msg.message}")
        return reply


class SharedTrainer:
    """The inner loop of native_node.trainer.Trainer on ONE model shared by every node."""

    def __init__(self, work: Workload, *, keep_opt_state: bool) -> None:
        self.work = work
        self.model = work.new_model()
        self.params = list(self.model.parameters())
        self.keep = keep_opt_state
        # label flipping: y -> C-1-y over the classes, or over the vocabulary for a language model
        self.n_classes = int(work.model_config.get("n_classes", 0)
                             or work.model_config.get("vocab_size", 0) or 0)
        self.opt = torch.optim.AdamW(self.params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)

    def train(self, node: SimNode, theta: np.ndarray, *, steps: int, lr: float,
              poison_labels: bool = False) -> tuple[np.ndarray, float | None, int, float]:
        assert node.sampler is not None
        load_flat(self.model, theta)
        opt = self.opt  # one optimizer object; its state is the node's (or empty = fresh)
        opt.state.clear()
        for group in opt.param_groups:
            group["lr"] = lr
        if self.keep and node.opt_state is not None:
            avg, sq, step = node.opt_state
            off = 0
            for p in self.params:
                n = p.numel()
                opt.state[p] = {
                    "step": torch.tensor(step, dtype=torch.float32),
                    "exp_avg": torch.from_numpy(avg[off:off + n].copy()).view_as(p),
                    "exp_avg_sq": torch.from_numpy(sq[off:off + n].copy()).view_as(p)}
                off += n
        self.model.train()
        losses: list[float] = []
        t0 = time.perf_counter()
        for _ in range(steps):
            xb, yb = node.sampler.sample()
            if poison_labels:
                yb = flip_labels(yb, self.n_classes)
            x = torch.from_numpy(np.ascontiguousarray(xb))
            y = torch.from_numpy(np.ascontiguousarray(yb))
            loss = loss_fn(self.model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
        compute = time.perf_counter() - t0
        if self.keep:
            st = [opt.state[p] for p in self.params]
            node.opt_state = (
                np.concatenate([s["exp_avg"].reshape(-1).numpy() for s in st]).astype(np.float32),
                np.concatenate([s["exp_avg_sq"].reshape(-1).numpy()
                                for s in st]).astype(np.float32),
                float(st[0]["step"]))
        delta = (theta.astype(np.float32) - flatten(self.model)).astype(np.float32)
        mean = float(np.mean(losses)) if losses else None
        return delta, (mean if mean is not None and math.isfinite(mean) else None), \
            steps * node.sampler.batch_size, compute
