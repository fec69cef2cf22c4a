"""The autonomy loop's policy: per round, the settings that fit the run's participants.

Pure and deterministic (stdlib only: it runs in Pyodide too): the same observations in the same
order give the same decisions. The coordinator (server.autotune) measures each round and asks
`Autotuner.decide`; bench.autotune drives the same class over a modelled population. What it
picks for the next round (docs/autotune.md has the why):

- a **time budget** instead of a fixed H: every trainer trains as many inner steps as fit in
  `budget_s` (at most `max_steps`, `continue_training` is the one rule every runtime applies),
  and the server's mean weighs each update by its steps;
- each node's **codec** (and top-k density) from its measured link, so that its upload takes
  at most `upload_share` of the budget;
- the **deadline** (the budget plus the slowest expected transfer, with margin) and the
  **quorum** (a share of the active trainers).

Guard rails: every numeric setting moves at most `max_change` per round (a codec at most
`max_codec_steps` rungs of the ladder); a change whose next rounds make slower progress (loss
decrease per second, relative to the distance to the floor) than the rounds before it is
rolled back and that direction is not tried again for `cooldown` rounds; the quorum is never
below the run's own, the deadline never above it. Any setting can be pinned by the operator.

Measures (per node per round: steps, compute seconds, the round trip from RoundOpen to the
update's arrival, bytes each way, staleness, validation score; per round: eval loss, floor,
aggregate norm, agreement of the updates with the aggregate) arrive as `NodeSample` and
`RoundSample`; the link is estimated as bytes moved / (round trip - compute), latency folded in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# codec ladder, least lossy first: (codec, topk fraction, estimated bytes per value)
# (bytes/value = 4 x shared.codecs' estimated_ratio; a test keeps them in step)
LADDER: tuple[tuple[str, float, float], ...] = (
    ("raw32", 0.0, 4.0),
    ("fp16", 0.0, 2.0),
    ("int8-block", 0.0, 1.004),
    ("topk", 0.1, 0.2016),
    ("topk", 0.03, 0.0611),
    ("topk", 0.01, 0.0229),
)
SETTINGS = ("budget_s", "max_steps", "deadline_s", "quorum", "codec")
FRAME_BYTES = 4096  # a signed update frame besides its payload (ML-DSA-65 signature, header)
PROBE = 5  # the first round runs inner_steps // PROBE steps (nothing is measured yet)
STRAGGLER = 2.0  # a node expected later than this x the median arrival is not waited for
LINK_MEMORY = 20  # rounds a node's last figures are kept while it is not measured


def continue_training(*, done: int, max_steps: int, elapsed_s: float,
                      budget_s: float | None) -> bool:
    """Whether a trainer that has run `done` steps in `elapsed_s` seconds takes another: below
    `max_steps` and, with a budget, while the next step (at the mean pace so far) ends within
    it. Always at least one step. The one rule every runtime applies (shared.participant)."""
    if done >= max_steps:
        return False
    if budget_s is None or done == 0:
        return True
    return elapsed_s + elapsed_s / done <= budget_s


def codec_label(codec: str, fraction: float) -> str:
    return f"topk {fraction:g}" if codec == "topk" else codec


def rung_of(codec: str, fraction: float) -> int:
    for i, (name, frac, _) in enumerate(LADDER):
        if name == codec and (name != "topk" or abs(frac - fraction) < 1e-9):
            return i
    return 0


@dataclass(frozen=True, kw_only=True)
class NodeSample:
    """One participant's round, as the coordinator measured it."""

    node_id: str
    runtime: str  # "native" / "browser"
    steps: int  # inner steps it trained (samples / batch size)
    compute_s: float  # its reported training seconds
    round_trip_s: float  # server clock: RoundOpen sent -> its update arrived
    bytes_down: int  # the RoundOpen it got
    bytes_up: int  # its update
    staleness: int = 0  # rounds late (a stale update applied to a later round)
    score: float | None = None  # validation loss of theta_r - its update, where scored
    late: bool = False  # it came after its round closed (not aggregated): its link counts

    @property
    def step_s(self) -> float:
        return self.compute_s / max(1, self.steps)

    @property
    def comm_s(self) -> float:
        return max(1e-3, self.round_trip_s - self.compute_s)


@dataclass(frozen=True, kw_only=True)
class RoundSample:
    """The run's view of a committed round."""

    round: int
    duration_s: float  # open -> commit, server clock
    eval_loss: float | None
    floor: float | None = None  # entropy floor of the data, where known
    aggregate_norm: float = 0.0
    agreement: float | None = None  # mean cosine of the updates with their aggregate
    n_active: int = 0  # connected trainers when the round committed
    n_params: int = 1


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What the next round's RoundOpen carries (budget None: exactly max_steps steps)."""

    budget_s: float | None
    max_steps: int
    deadline_s: float
    quorum: int
    codecs: Mapping[str, tuple[str, float]] = field(default_factory=dict)  # node -> codec

    def codec_for(self, node_id: str, default: tuple[str, float]) -> tuple[str, float]:
        return self.codecs.get(node_id, default)

    def to_dict(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "max_steps": self.max_steps,
                "deadline_s": self.deadline_s, "quorum": self.quorum,
                "codecs": {n: codec_label(*c) for n, c in sorted(self.codecs.items())}}


@dataclass(frozen=True, kw_only=True)
class Limits:
    """The run's own settings and the policy's bounds (server.config maps the run config)."""

    inner_steps: int  # the run's H: the first round's steps, and the budget's first measure
    quorum: int  # the run's robustness floor: never below it
    deadline_s: float  # the run's collection window: never above it
    max_steps: int  # most inner steps one node may run in one round
    codec: str = "raw32"  # the run's codec (rung 0 of what may be chosen: never less lossy)
    tune_codec: bool = True  # off: every node keeps the run's codec (p2p, validation)
    pins: Mapping[str, Any] = field(default_factory=dict)  # setting -> fixed value
    max_change: float = 0.25  # a numeric setting moves at most this factor per round
    max_codec_steps: int = 2  # ladder rungs a node's codec moves per round
    comm_share: float = 0.5  # a round spends at most this share communicating
    upload_share: float = 0.1  # a node's upload should take at most this share of the budget
    quorum_share: float = 0.5  # quorum = this share of the active trainers (>= the run's)
    min_budget_s: float = 0.05
    rollback_margin: float = 0.3  # roll back when progress falls by more than this share
    cooldown: int = 4  # rounds a rolled-back direction is not tried again


@dataclass(frozen=True, kw_only=True)
class Decision:
    round: int  # the round these settings apply to
    settings: Settings
    changes: tuple[dict[str, Any], ...]  # {"setting", "old", "new", "reason"}
    inputs: dict[str, Any]  # what the decision was made from (stored with it)


@dataclass
class _Link:
    step_s: float
    bps: float  # effective bytes per second (latency folded in)
    runtime: str
    seen: int = 0  # the last round it was measured in


@dataclass
class _Trial:
    """A budget change on probation: kept unless the rounds after it progress slower."""

    old: float
    new: float
    rate_before: float
    rates: list[float] = field(default_factory=list)


class Autotuner:
    """The policy's state across rounds: smoothed per-node figures, the current settings,
    the budget change on probation and the directions that failed."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        pins = limits.pins
        # the first round probes: a fifth of H, to measure every node soon
        self.settings = Settings(
            budget_s=pins.get("budget_s"),
            max_steps=int(pins.get("max_steps", max(1, limits.inner_steps // PROBE))),
            deadline_s=float(pins.get("deadline_s", limits.deadline_s)),
            quorum=int(pins.get("quorum", limits.quorum)), codecs={})
        self.links: dict[str, _Link] = {}
        self.rates: list[float] = []  # progress per second of the committed rounds
        self.last_loss: float | None = None
        self.trial: _Trial | None = None
        self.blocked: dict[str, int] = {}  # "budget_s+" / "budget_s-" -> until round
        self._n_params = 1
        self.overhead_s = 0.0
        self.included: set[str] | None = None  # the nodes the deadline waits for

    # -- measuring ------------------------------------------------------------------------
    def _absorb(self, nodes: Sequence[NodeSample], run: RoundSample) -> None:
        for s in nodes:
            if s.steps <= 0:
                continue
            bps = (s.bytes_up + s.bytes_down) / s.comm_s
            old = self.links.get(s.node_id)
            if old is None:
                self.links[s.node_id] = _Link(step_s=s.step_s, bps=bps, runtime=s.runtime,
                                              seen=run.round)
            else:  # smoothed, but a link that got much worse counts at once
                old.step_s = 0.5 * old.step_s + 0.5 * s.step_s
                old.bps = bps if bps < 0.5 * old.bps else 0.5 * old.bps + 0.5 * bps
                old.seen = run.round
        ontime = [s for s in nodes if not s.late]
        if ontime:  # what the server spends per round besides waiting: reduce, score, commit
            self.overhead_s = max(0.0, run.duration_s - max(s.round_trip_s for s in ontime))
        if run.eval_loss is not None and math.isfinite(run.eval_loss):
            floor = run.floor if run.floor is not None else 0.0
            if self.last_loss is not None and run.duration_s > 0:
                gap0 = max(self.last_loss - floor, 1e-9)
                gap1 = max(run.eval_loss - floor, 1e-9)
                self.rates.append(math.log(gap0 / gap1) / run.duration_s)
            self.last_loss = run.eval_loss

    # -- deciding -------------------------------------------------------------------------
    def decide(self, nodes: Sequence[NodeSample], run: RoundSample) -> Decision:
        """Observe round `run.round` (its nodes' samples) -> the settings of the next round."""
        self._absorb(nodes, run)
        self._n_params = max(1, run.n_params)
        cur = self.settings
        changes: list[dict[str, Any]] = []
        # the nodes measured lately (one that missed a deadline keeps its last figures)
        links = {n: link for n, link in self.links.items()
                 if link.seen >= run.round - LINK_MEMORY}
        if not nodes or not links:
            return Decision(round=run.round + 1, settings=cur, changes=(),
                            inputs=self._inputs(nodes, run, {}))
        first = cur.budget_s is None  # the first decision replaces unmeasured run defaults
        budget = self._budget(links, run, changes, first)
        max_steps = self._max_steps(links, budget, changes, first)
        codecs = self._codecs(links, budget if budget is not None else self._round_time(links),
                              changes)
        quorum = self._quorum(run, changes)
        deadline = self._deadline(links, budget, max_steps, codecs, quorum, changes, first)
        self.settings = Settings(budget_s=budget, max_steps=max_steps, deadline_s=deadline,
                                 quorum=quorum, codecs=codecs)
        return Decision(round=run.round + 1, settings=self.settings, changes=tuple(changes),
                        inputs=self._inputs(nodes, run, links))

    def _bounded(self, old: float, target: float) -> float:
        f = 1.0 + self.limits.max_change
        return min(max(target, old / f), old * f)

    def _round_time(self, links: Mapping[str, _Link]) -> float:
        """Training time of the current setting's slowest node (the budget's first value)."""
        if self.settings.budget_s is not None:
            return self.settings.budget_s
        return max(link.step_s for link in links.values()) * self.settings.max_steps

    def _comm_s(self, link: _Link, codec: tuple[str, float]) -> float:
        """Expected transfer time: the full params down, the update up (+ its frame)."""
        n = self._n_params
        per_value = LADDER[rung_of(*codec)][2]
        return (4 * n + per_value * n + 2 * FRAME_BYTES) / max(link.bps, 1.0)

    def _budget(self, links: Mapping[str, _Link], run: RoundSample,
                changes: list[dict[str, Any]], first: bool) -> float | None:
        lim, cur = self.limits, self.settings
        if "budget_s" in lim.pins:
            return float(lim.pins["budget_s"])
        old = self._round_time(links)
        if self.trial is not None and self._judge(run, changes):
            return self.settings.budget_s
        # the slowest expected transfer among the nodes the deadline waits for
        waited = [n for n in links if self.included is None or n in self.included] or list(links)
        comm = max(self._comm_s(links[n], cur.codec_for(n, (lim.codec, 0.01))) for n in waited)
        share = lim.comm_share
        target = max(lim.min_budget_s, comm * (1 - share) / share)
        if first:
            steps = [link.step_s for link in links.values()]
            idle = 1 - min(steps) / max(steps)
            new = target
            changes.append({"setting": "budget_s", "old": f"H {cur.max_steps}",
                            "new": round(new, 3), "reason":
                            f"H {cur.max_steps} -> {new:.2f} s of training per node: the "
                            f"fastest nodes idled {idle:.0%} of the round waiting for the "
                            f"slowest"})
            return new
        new = self._bounded(old, target)
        direction = "budget_s+" if new > old else "budget_s-"
        if abs(new - old) <= 0.02 * old or self.blocked.get(direction, -1) >= run.round:
            return old
        rate = self._recent_rate()
        if rate is not None:
            self.trial = _Trial(old=old, new=new, rate_before=rate)
        changes.append({"setting": "budget_s", "old": round(old, 3), "new": round(new, 3),
                        "reason": f"budget {old:.2f} s -> {new:.2f} s: the slowest transfer "
                                  f"takes {comm:.2f} s, {comm / (old + comm):.0%} of the "
                                  f"round (target {share:.0%})"})
        return new

    def _recent_rate(self) -> float | None:
        recent = self.rates[-2:]
        return sum(recent) / len(recent) if recent else None

    def _judge(self, run: RoundSample, changes: list[dict[str, Any]]) -> bool:
        """The budget change on probation after the rounds that followed it: True while it
        is still being judged or when it was rolled back (the budget stays as set)."""
        trial = self.trial
        assert trial is not None
        if self.rates:
            trial.rates.append(self.rates[-1])
        if len(trial.rates) < 2:
            return True
        after = sum(trial.rates) / len(trial.rates)
        self.trial = None
        before = trial.rate_before
        if before > 0 and after < (1 - self.limits.rollback_margin) * before:
            direction = "budget_s+" if trial.new > trial.old else "budget_s-"
            self.blocked[direction] = run.round + self.limits.cooldown
            self.settings = dataclasses.replace(self.settings, budget_s=trial.old)
            changes.append({"setting": "budget_s", "old": round(trial.new, 3),
                            "new": round(trial.old, 3), "reason":
                            f"budget {trial.new:.2f} s -> {trial.old:.2f} s rolled back: the "
                            f"loss fell {1 - after / before:.0%} slower per second after the "
                            f"change"})
            return True
        return False

    def _max_steps(self, links: Mapping[str, _Link], budget: float | None,
                   changes: list[dict[str, Any]], first: bool) -> int:
        lim, cur = self.limits, self.settings
        if "max_steps" in lim.pins:
            return int(lim.pins["max_steps"])
        if budget is None:
            return cur.max_steps
        # the median node's pace: a faster node stops early rather than outweigh the rest
        # with many more steps on its own shard (the mean weighs updates by steps)
        paces = sorted(link.step_s for link in links.values())
        median = paces[(len(paces) - 1) // 2]
        target = min(lim.max_steps, max(1, math.ceil(budget / max(median, 1e-6))))
        new = target if first else max(1, round(self._bounded(cur.max_steps, target)))
        if new != cur.max_steps:
            changes.append({"setting": "max_steps", "old": cur.max_steps, "new": new,
                            "reason": f"at most {cur.max_steps} -> {new} inner steps: what the "
                                      f"median node runs in the budget at "
                                      f"{median * 1000:.1f} ms per step (cap {lim.max_steps})"})
        return new

    def _codecs(self, links: Mapping[str, _Link], budget: float,
                changes: list[dict[str, Any]]) -> dict[str, tuple[str, float]]:
        lim, cur = self.limits, self.settings
        default = (lim.codec, 0.01)
        if "codec" in lim.pins or not lim.tune_codec:
            return {}
        floor = rung_of(lim.codec, 0.01)
        out: dict[str, tuple[str, float]] = {}
        n = self._n_params
        for node, link in sorted(links.items()):
            old = cur.codec_for(node, default)
            r0 = rung_of(*old)
            allowed = lim.upload_share * budget
            want = len(LADDER) - 1
            for i in range(floor, len(LADDER)):
                # a less lossy codec than now only with room to spare (no flapping)
                room = allowed if i >= r0 else 0.5 * allowed
                if (LADDER[i][2] * n + FRAME_BYTES) / max(link.bps, 1.0) <= room:
                    want = i
                    break
            step = max(-lim.max_codec_steps, min(lim.max_codec_steps, want - r0))
            r1 = max(floor, r0 + step)
            new = (LADDER[r1][0], LADDER[r1][1] or 0.01)
            out[node] = new
            if r1 != r0:
                took = (LADDER[r0][2] * n + FRAME_BYTES) / max(link.bps, 1.0)
                changes.append({"setting": "codec", "node_id": node,
                                "old": codec_label(*old), "new": codec_label(*new),
                                "reason": f"{link.runtime} {node[:8]} codec "
                                          f"{codec_label(*old)} -> {codec_label(*new)}: its "
                                          f"update takes {took:.2f} s at "
                                          f"{link.bps * 8 / 1e6:.2f} Mbit/s, the target is "
                                          f"{allowed:.2f} s ({lim.upload_share:.0%} of "
                                          f"{budget:.2f} s)"})
        return out

    def _deadline(self, links: Mapping[str, _Link], budget: float | None, max_steps: int,
                  codecs: Mapping[str, tuple[str, float]], quorum: int,
                  changes: list[dict[str, Any]], first: bool) -> float:
        """Wait for every node but the stragglers: each node's expected arrival (its training,
        capped by max_steps, + its transfers with its codec); a straggler is expected later
        than STRAGGLER x the median arrival (but the quorum's nodes are always waited for).
        The deadline is the last awaited arrival with a 30% margin + 0.1 s."""
        lim, cur = self.limits, self.settings
        plan = []
        for n, link in links.items():
            steps = max_steps if budget is None else max(
                1, min(max_steps, math.floor(budget / max(link.step_s, 1e-9))))
            arrive = steps * link.step_s + self._comm_s(link, codecs.get(n, (lim.codec, 0.01)))
            plan.append((arrive, n))
        plan.sort()
        median = plan[(len(plan) - 1) // 2][0]
        j = max(min(len(plan), quorum), sum(1 for a, _ in plan if a <= STRAGGLER * median))
        self.included = {n for _, n in plan[:j]}
        if "deadline_s" in lim.pins:
            return float(lim.pins["deadline_s"])
        expect = plan[j - 1][0]
        target = min(lim.deadline_s, 1.3 * expect + 0.1)
        # it may grow at once (never cut the nodes it waits for); it shrinks bounded
        new = target if first or target > cur.deadline_s else self._bounded(cur.deadline_s,
                                                                             target)
        if abs(new - cur.deadline_s) <= 0.05 * cur.deadline_s:
            return cur.deadline_s
        left = plan[j:]
        why = (f"waits for all {len(plan)} nodes (the last expected after {expect:.2f} s)"
               if not left else
               f"waits for {j} of {len(plan)} nodes (expected after {expect:.2f} s); "
               f"{len(left)} straggling "
               f"{'/'.join(sorted({links[n].runtime for _, n in left}))} node(s) expected "
               f"after {left[-1][0]:.2f} s, over {STRAGGLER:g}x the median {median:.2f} s, "
               f"are not waited for")
        changes.append({"setting": "deadline_s", "old": round(cur.deadline_s, 3),
                        "new": round(new, 3),
                        "reason": f"deadline {cur.deadline_s:.2f} s -> {new:.2f} s: {why}"})
        return new

    def _quorum(self, run: RoundSample, changes: list[dict[str, Any]]) -> int:
        lim, cur = self.limits, self.settings
        if "quorum" in lim.pins:
            return int(lim.pins["quorum"])
        new = max(lim.quorum, math.ceil(lim.quorum_share * run.n_active))
        if new != cur.quorum:
            changes.append({"setting": "quorum", "old": cur.quorum, "new": new,
                            "reason": f"quorum {cur.quorum} -> {new}: {lim.quorum_share:.0%} "
                                      f"of {run.n_active} active trainers (never below the "
                                      f"run's {lim.quorum})"})
        return new

    def _inputs(self, nodes: Sequence[NodeSample], run: RoundSample,
                links: Mapping[str, _Link]) -> dict[str, Any]:
        return {
            "round": run.round, "duration_s": round(run.duration_s, 4),
            "eval_loss": run.eval_loss, "floor": run.floor,
            "aggregate_norm": round(run.aggregate_norm, 6), "agreement": run.agreement,
            "n_active": run.n_active, "progress_per_s": self.rates[-1] if self.rates else None,
            "nodes": [{"node_id": s.node_id, "runtime": s.runtime, "steps": s.steps,
                       "compute_s": round(s.compute_s, 4), "round_trip_s": round(s.round_trip_s, 4),
                       "bytes_down": s.bytes_down, "bytes_up": s.bytes_up,
                       "staleness": s.staleness, "score": s.score, "late": s.late,
                       "steps_per_s": round(s.steps / s.compute_s, 2) if s.compute_s > 0 else None,
                       "link_mbit_s": round(links[s.node_id].bps * 8 / 1e6, 3)
                       if s.node_id in links else None} for s in nodes]}
