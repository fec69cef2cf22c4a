"""The coordinator's side of the autonomy loop: measure each round, ask the policy, apply and
record its decision (docs/autotune.md).

`AutotuneLoop` is a collaborator of the coordinator (run config `autotune = true`):

- **measure**: when a node is sent a RoundOpen (`on_open`: server clock, bytes) and when its
  update is accepted (`on_update`: server clock, bytes, steps = samples / batch size, its
  compute seconds, staleness); after the commit, the round's eval loss against the data's
  floor, the aggregate's norm and the agreement (mean cosine) of the updates with it;
- **decide**: `shared.autotune.Autotuner.decide` (pure) gives the next round's settings;
- **act**: the next RoundOpen of each node carries the budget, its step cap and its codec
  (`open_fields`); the round's deadline and quorum come from `round_policy`; the server's mean
  weighs each update by its steps (server.reduction);
- **explain**: every decision is a row of the store's `autotune` table (round, settings,
  changes with their reasons, the inputs) served by /api/run and /api/autotune and shown on
  the page.

Off (the default), nothing here changes a round: RoundOpen says exactly `inner_steps`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import numpy as np

from server.runstate import RunState
from shared.autotune import Autotuner, Decision, Limits, NodeSample, RoundSample, Settings
from shared.messages import Ready, Submit
from shared.rounds import RoundPolicy

log = logging.getLogger("server.autotune")
# run codecs the ladder starts from (never less lossy than the run's); others are kept as set
TUNABLE_FROM = ("raw32", "fp16", "int8-block")
KEEP_ASSIGNED = 4  # rounds whose codec assignments an update may still be checked against


class AutotuneLoop:
    def __init__(self, run: RunState) -> None:
        self.run, self.config = run, run.config
        cfg = self.config
        self.enabled = cfg.autotune
        pins = dict(cfg.autotune_pin)
        self.pinned_codec: str | None = pins.get("codec")
        self.limits = Limits(inner_steps=cfg.inner_steps, quorum=cfg.quorum,
                             deadline_s=cfg.deadline_s, max_steps=cfg.autotune_steps_cap,
                             codec=cfg.codec,
                             tune_codec=cfg.transport != "p2p" and not cfg.validation
                             and cfg.codec in TUNABLE_FROM and not cfg.codec_params,
                             pins=pins)
        self.tuner = Autotuner(self.limits)
        self.last: Decision | None = None
        # round -> node -> (RoundOpen sent at, its bytes): this round's and the last one's
        self.opened: dict[int, dict[str, tuple[float, int]]] = {}
        self.round = -1  # the open round
        self.samples: dict[str, NodeSample] = {}  # node -> its accepted update's sample
        self.assigned: dict[int, dict[str, str]] = {}  # round -> node -> codec it was given
        self._resume()

    def _resume(self) -> None:
        """After a restart: the newest stored decision's settings are the current ones."""
        if not self.enabled:
            return
        rows = self.run.store.autotune_decisions(limit=1, newest=True)
        if rows:
            s = rows[0]["settings"]
            self.tuner.settings = Settings(
                budget_s=s["budget_s"], max_steps=int(s["max_steps"]),
                deadline_s=float(s["deadline_s"]), quorum=int(s["quorum"]),
                codecs={n: _parse_codec(c) for n, c in s["codecs"].items()})

    @property
    def settings(self) -> Settings:
        return self.tuner.settings

    # -- act ------------------------------------------------------------------------------
    def round_policy(self, base: RoundPolicy) -> RoundPolicy:
        """The open round's quorum and deadline (the run's own when autotune is off)."""
        if not self.enabled:
            return base
        s = self.settings
        return RoundPolicy(quorum=max(base.quorum, s.quorum),
                           deadline_s=min(base.deadline_s, s.deadline_s))

    def codec_of(self, node_id: str) -> tuple[str, float]:
        """(codec, topk fraction) of `node_id`'s next update ("": the run's codec)."""
        if not self.enabled:
            return "", 0.01
        if self.pinned_codec is not None:
            return self.pinned_codec, 0.01
        codec = self.settings.codecs.get(node_id)
        if codec is None or (codec[0] == self.config.codec and not self.config.codec_params):
            return "", 0.01
        return codec

    def open_fields(self, node_id: str | None, round_: int) -> dict[str, Any]:
        """The RoundOpen fields autotune sets for `node_id` in `round_`."""
        if not self.enabled:
            return {}
        codec, fraction = self.codec_of(node_id) if node_id else ("", 0.01)
        if node_id:
            self.assigned.setdefault(round_, {})[node_id] = codec or self.config.codec
            for old in [r for r in self.assigned if r < round_ - KEEP_ASSIGNED]:
                del self.assigned[old]
        s = self.settings
        return {"time_budget_s": s.budget_s, "inner_steps": s.max_steps, "codec": codec,
                "topk_fraction": fraction}

    def accepts_codec(self, node_id: str, round_: int, codec: str) -> bool:
        """Whether an update for `round_` may use `codec`: the one this node was given."""
        if not self.enabled:
            return codec == self.config.codec
        given = self.assigned.get(round_, {}).get(node_id)
        return codec == (given or self.config.codec)

    @property
    def weigh_by_steps(self) -> bool:
        return self.enabled and self.config.autotune_weights == "steps"

    # -- measure --------------------------------------------------------------------------
    def on_open(self, node_id: str, nbytes: int) -> None:
        if self.enabled:
            self.opened.setdefault(self.round, {})[node_id] = (
                asyncio.get_running_loop().time(), nbytes)

    def on_round_open(self, round_: int) -> None:
        self.round = round_
        for old in [r for r in self.opened if r < round_ - 1]:
            del self.opened[old]
        self.samples.clear()

    def on_update(self, node_id: str, runtime: str, msg: Submit | Ready, nbytes: int,
                  staleness: int, *, late: bool = False) -> None:
        """An update accepted (or, `late`, refused because its round had closed: its timing
        still tells how slow the node's link or compute is)."""
        sent_down = self.opened.get(msg.round, {}).get(node_id)
        if not self.enabled or sent_down is None:
            return
        sent, down = sent_down
        now = asyncio.get_running_loop().time()
        key = node_id + (":late" if late else "")
        self.samples[key] = NodeSample(
            node_id=node_id, runtime=runtime,
            steps=msg.samples // max(1, self.config.batch_size), compute_s=msg.compute_s,
            round_trip_s=now - sent, bytes_down=down, bytes_up=nbytes, staleness=staleness,
            late=late)

    def take_samples(self) -> dict[str, NodeSample]:
        """The round's samples so far, for `after_commit` (called on the event loop, where
        updates keep arriving; after_commit may run in a thread)."""
        return dict(self.samples)

    def after_commit(self, *, round_: int, duration_s: float, eval_loss: float | None,
                     aggregate: np.ndarray, vectors: list[np.ndarray], n_active: int,
                     scores: dict[str, float | None], samples: dict[str, NodeSample]
                     ) -> Decision | None:
        """The committed round's measures -> the next round's settings, stored."""
        if not self.enabled:
            return None
        norm = float(np.linalg.norm(aggregate))
        agreement: float | None = None
        if vectors and norm > 0:
            cos = [float(np.dot(v, aggregate) / (np.linalg.norm(v) * norm))
                   for v in vectors if np.linalg.norm(v) > 0]
            agreement = round(float(np.mean(cos)), 6) if cos else None
        nodes = [dataclasses.replace(s, score=scores.get(s.node_id))
                 for _, s in sorted(samples.items())]
        sample = RoundSample(round=round_, duration_s=duration_s, eval_loss=eval_loss,
                             floor=self.run.entropy_floor, aggregate_norm=norm,
                             agreement=agreement, n_active=n_active, n_params=self.run.n_params)
        decision = self.tuner.decide(nodes, sample)
        self.last = decision
        self.run.store.record_autotune(round_=decision.round,
                                       settings=decision.settings.to_dict(),
                                       changes=list(decision.changes), inputs=decision.inputs)
        for c in decision.changes:
            log.info("autotune round %d: %s", decision.round, c["reason"])
        return decision

    # -- explain --------------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        """For /api/run: on or off, the pins, the current settings and the newest reasons."""
        out: dict[str, Any] = {"enabled": self.enabled, "pins": dict(self.config.autotune_pin)}
        if not self.enabled:
            return out
        recent = self.run.store.autotune_decisions(limit=10, newest=True)
        return {**out, "settings": self.settings.to_dict(),
                "decisions": self.run.store.autotune_count(),
                # the newest decisions' reasons (their inputs: /api/autotune)
                "recent": [{"round": d["round"], "decided_at": d["decided_at"],
                            "changes": d["changes"]} for d in recent]}


def _parse_codec(label: str) -> tuple[str, float]:
    """"topk 0.1" -> ("topk", 0.1); "raw32" -> ("raw32", 0.01) (shared.autotune.codec_label)."""
    name, _, frac = label.partition(" ")
    return name, float(frac) if frac else 0.01
