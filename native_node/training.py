"""The native node's training: the torch inner steps of a round, steps run ahead of the next
round (run option overlap, shared.overlap), the Submit of the result, and a validator's scoring.

A mixin of NodeClient (native_node/client.py), which owns the socket, the participant and the
trainer; this module only turns the participant's train and validate events into torch work
in a thread and hands the results back to the participant.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ml import memory
from ml.scoring import ProbeScorer, score_candidates
from ml.workload import Workload
from native_node.chunk_update import ParamsDelta, RssPeak
from native_node.distributed_trainer import DistributedTrainer
from native_node.trainer import Rebase, RoundResult, Trainer
from shared.participant import Event, Participant

if TYPE_CHECKING:
    from native_node.client import NodeOptions

log = logging.getLogger("native_node")


class TrainingMixin:
    """NodeClient's training half (see the module doc)."""

    opts: NodeOptions
    part: Participant
    work: Workload | None
    trainer: Trainer | DistributedTrainer | None
    scorer: ProbeScorer | None
    task: asyncio.Task[None] | None
    cancel: threading.Event
    rebase: Rebase | None  # the steps running ahead take the new params here
    ahead_done: RoundResult | None  # steps ahead done, their round not open
    last_train: Event | None  # the last train event (steps, lr, batch size)

    async def on_event(self, ev: Event) -> bool:
        raise NotImplementedError  # NodeClient's

    def _start_training(self, ev: Event) -> None:
        if ev["kind"] == "train_ahead":
            self._start_ahead()
            return
        if ev.get("merge") and self._merge_ahead(ev):
            return
        self.cancel.set()  # a previous round still training stops (the participant said so)
        self.cancel = threading.Event()
        self.rebase = self.ahead_done = None
        self.last_train = {k: v for k, v in ev.items() if k != "params"}  # no stale params
        theta = self._round_params(ev)  # the trainer copies it in
        if theta is self.part.held:
            ev.pop("params", None)  # nothing reads the event's copy after this
        self.task = asyncio.create_task(self._train_and_submit(self.last_train, theta,
                                                               self.cancel))

    def _round_params(self, ev: Event) -> np.ndarray:
        """The train event's params: the participant's own array when it holds those very
        params (then the event's bytes, a copy of it, are let go at once: 0.5 GB at 125M),
        else a read-only view of the bytes."""
        held, raw = self.part.held, ev["params"]
        if (isinstance(held, np.ndarray) and held.dtype == np.float32
                and held.nbytes == len(raw) and self.part.held_digest == ev["params_digest"]):
            return held
        return np.frombuffer(raw, dtype="<f4")

    def _start_ahead(self) -> None:
        """Overlap: train the next round from the local params now (shared.overlap)."""
        if self.part.ahead.after is None:  # the next round opened while the Submit was being
            return  # sent: it is already training from its params, as without the option
        if self.last_train is None or not isinstance(self.trainer, Trainer):
            self.part.ahead.drop()  # its RoundOpen then trains as without the option
            return
        self.cancel.set()
        self.cancel = threading.Event()
        self.rebase, self.ahead_done = Rebase(), None
        self.task = asyncio.create_task(self._train_and_submit(self.last_train, None,
                                                               self.cancel, self.rebase))

    def _merge_ahead(self, ev: Event) -> bool:
        """The round the steps run ahead belong to opened: hand its params to them (merged
        between steps), or merge now when they are done. False: none run ahead."""
        rebase = self.rebase
        if rebase is None:
            return False
        self.last_train = {k: v for k, v in ev.items() if k != "params"}
        if rebase.put(int(ev["round"]), np.frombuffer(ev["params"], dtype="<f4").copy()):
            return True
        done, self.ahead_done = self.ahead_done, None
        if done is not None:  # else the trainer's task is finishing: it sees the late params
            self.task = asyncio.create_task(self._after_ahead(done, rebase, self.cancel))
        return True

    async def _after_ahead(self, result: RoundResult, rebase: Rebase,
                           cancel: threading.Event) -> None:
        """Steps run ahead are done: submit them if merged, else wait for their round."""
        if cancel.is_set() or not isinstance(self.trainer, Trainer):
            if rebase.round is not None:
                self.part.training_stopped(rebase.round)
            if self.rebase is rebase:
                self.rebase = None
            return
        delta = result.delta
        if not rebase.merged:
            late = rebase.take()
            if late is None:
                self.ahead_done = result  # _merge_ahead goes on when the round opens
                return
            delta = await asyncio.to_thread(self.trainer.merge_after, late)
        if self.rebase is rebase:
            self.rebase = None
        assert rebase.round is not None
        log.info("round %d: %d steps (overlapped with the previous round's upload) in %.1f s",
                 rebase.round, result.steps, result.compute_s)
        await self._submit(rebase.round, delta, result)

    async def _submit(self, round_: int, delta_arr: np.ndarray, result: RoundResult) -> None:
        # the participant reads the trainer's array in place (no bytes copy of Δ: 0.5 GB at 125M)
        delta = np.ascontiguousarray(delta_arr, dtype="<f4").data.cast("B")
        with RssPeak() as rss:  # (measured until the update's frames are handed on)
            for out in self.part.submit(round_, delta, train_loss=result.train_loss,
                                        samples=result.samples, compute_s=result.compute_s):
                await self.on_event(out)
        log.info("round %d: update encoded in one piece: %s", round_, rss.line())
        del delta
        memory.trim()  # the encoding's temporaries (several copies of Δ at their peak)

    def _release_base(self, chunks: bool) -> None:
        """The trainer kept θ_r for Δ by chunks, which will not be read: let it go."""
        if chunks and isinstance(self.trainer, Trainer):
            self.trainer.params.release()

    async def _submit_chunks(self, round_: int, result: RoundResult) -> None:
        """Δ read a chunk at a time from the trainer's base and trained params: in a
        streamed run it is never whole (shared.chunk_submit; else the participant takes the
        whole Δ from the source). The base is let go once the update is encoded."""
        assert isinstance(self.trainer, Trainer)
        source, before = ParamsDelta(self.trainer.params), self.part.counts.get("chunk_encoded")
        with RssPeak() as rss:
            try:
                events = self.part.submit(round_, source, train_loss=result.train_loss,
                                          samples=result.samples, compute_s=result.compute_s)
            finally:
                source.release()
            for out in events:
                await self.on_event(out)
        how = f"by chunks ({source.reads} chunks of the pseudo-gradient read)" \
            if self.part.counts.get("chunk_encoded") != before else "in one piece"
        log.info("round %d: update encoded %s: %s", round_, how, rss.line())
        memory.trim()

    async def _train_and_submit(self, ev: Event, theta: np.ndarray | None,
                                cancel: threading.Event, rebase: Rebase | None = None) -> None:
        assert self.trainer is not None
        round_, steps = int(ev["round"]), int(ev["steps"])
        bar = self._progress_bar(round_ + (rebase is not None), steps)
        # the trainer stops when the round moves on (cancel) or when the participant says
        # the round's steps or time budget are used up (autotune: keep_training)
        halt, started = threading.Event(), time.perf_counter()
        # Δ by chunks (native_node.chunk_update) when the participant may spool the update
        chunks = isinstance(self.trainer, Trainer) and self.part.spool is not None \
            and rebase is None

        def progress(done: int, loss: float) -> None:
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                bar.update(1)
            now = round_ if rebase is None else rebase.round  # ahead: None until it opens
            if cancel.is_set() or (now is None and done >= steps) or (
                    now is not None and not self.part.keep_training(
                        now, done, time.perf_counter() - started)):
                halt.set()

        if rebase is not None:  # steps run ahead: the one-process torch trainer (_start_ahead)
            assert isinstance(self.trainer, Trainer)
            call = functools.partial(self.trainer.train_round, None, rebase=rebase)
        elif isinstance(self.trainer, Trainer):
            assert theta is not None
            call = functools.partial(self.trainer.train_round, theta, keep_base=chunks)
        else:
            assert theta is not None
            call = functools.partial(self.trainer.train_round, theta)
        try:
            result: RoundResult = await asyncio.to_thread(
                call, steps=steps, lr=ev["lr"], batch_size=ev["batch_size"], cancel=halt,
                progress=progress)
        except BaseException:
            self._release_base(chunks)
            stopped = round_ if rebase is None else rebase.round
            if stopped is not None:
                self.part.training_stopped(stopped)
            raise
        finally:
            if bar is not None:
                bar.close()
        if rebase is not None:
            await self._after_ahead(result, rebase, cancel)
            return
        if cancel.is_set() or (result.steps < steps and ev.get("time_budget_s") is None):
            log.info("round %d: training cancelled after %d steps", round_, result.steps)
            self.part.training_stopped(round_)
            self._release_base(chunks)
            return
        loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "n/a"
        log.info("round %d: %d steps in %.1f s, train loss %s", round_, result.steps,
                 result.compute_s, loss)
        if chunks:
            await self._submit_chunks(round_, result)
            return
        await self._submit(round_, result.delta, result)

    async def _validate(self, ev: Event) -> None:
        """Score the round's candidates (torch, in a thread) and answer with a Verdict."""
        if self.scorer is None or self.work is None:
            log.warning("round %d: a validation request, but this node is a %s", ev["round"],
                        self.opts.role)
            return
        theta = np.frombuffer(ev["params"], dtype="<f4").copy()
        base, losses = await asyncio.to_thread(
            score_candidates, self.scorer, theta, [c["payload"] for c in ev["candidates"]],
            length=ev["length"], codec=ev["codec"], layout=self.work.manifest)
        log.info("round %d: scored %d candidates (base loss %s)", ev["round"], len(losses),
                 f"{base:.4f}" if base is not None else "n/a")
        for out in self.part.verdict(ev["round"], base, losses):
            await self.on_event(out)

    def _progress_bar(self, round_: int, steps: int) -> Any:
        if not self.opts.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=steps, desc=f"round {round_}", unit="step", leave=False,
                    dynamic_ncols=True)
