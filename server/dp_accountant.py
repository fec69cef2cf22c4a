"""The run's privacy accountant and participant sampling (client-level DP, docs/privacy.md).

Each committed round is one sampled Gaussian mechanism: Poisson sampling with rate q
(shared.dp.poisson_sample, from the run seed) and the sum's noise multiplier sigma. Google's
`dp-accounting` composes them: RDP (the budget's default) and PLD, epsilon at `dp_delta`.
A draw that picks nobody is drawn again and counted as a step too (conservative). The step
count lives in memory; after a restart it starts from the committed rounds (one draw each).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from server.config import RunConfig
from shared.dp import poisson_sample, sampled

log = logging.getLogger("daa.dp")


def epsilon(*, sigma: float, q: float, steps: int, delta: float, accountant: str = "rdp"
            ) -> float:
    """Epsilon at `delta` after `steps` Poisson-sampled Gaussian mechanisms (dp-accounting)."""
    if steps <= 0:
        return 0.0
    if sigma <= 0:
        return math.inf
    import dp_accounting
    from dp_accounting import pld, rdp

    # RDP orders whose series does not converge are dropped with a warning each: not news
    logging.getLogger("absl").setLevel(logging.ERROR)

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    acc: Any
    if accountant == "rdp":
        acc = rdp.RdpAccountant()
    elif accountant == "pld":
        acc = pld.PLDAccountant()
    else:
        raise ValueError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")
    acc.compose(event)
    return float(acc.get_epsilon(delta))


class DpAccountant:
    """Which trainers a round samples, the noise fields of its RoundOpen, epsilon so far."""

    def __init__(self, config: RunConfig, committed_rounds: int = 0) -> None:
        self.config = config
        self.enabled = config.dp_clip > 0
        self.steps = committed_rounds if self.enabled else 0
        self.history: list[dict[str, Any]] = []  # {"round", "steps", "epsilon", "epsilon_pld"}
        self.pending_draws = 0  # draws of the open round (counted when it commits)
        self.pending_round = -1  # the round they were drawn for
        self.draw = 0  # the draw of pending_round whose coins decide membership
        self.stop_reason: str | None = None

    def sample(self, round_: int, trainers: list[str]) -> list[str] | None:
        """The open round's participants among the connected `trainers` (None: no DP
        sampling, every trainer takes part). Drawn at open, and again on a retry whose
        sample has left (continuing the draws)."""
        if not self.enabled:
            return None
        if self.pending_round != round_:
            self.pending_round, self.pending_draws = round_, 0
        picked, draws = poisson_sample(self.config.seed, round_, sorted(trainers),
                                       self.config.dp_sample_rate,
                                       first_draw=self.pending_draws)
        self.draw = self.pending_draws + max(0, draws - 1)  # the draw that counts
        self.pending_draws += draws
        return picked

    def member(self, node_id: str) -> bool:
        """Whether `node_id` is in the open round's sample: its own coin of the round's
        draw, so that a trainer that connects after the round opened is sampled (or not)
        exactly as if it had been there (its noise share only adds to the sum's)."""
        return sampled(self.config.seed, self.pending_round, self.draw, node_id,
                       self.config.dp_sample_rate)

    def open_fields(self, participants: int) -> dict[str, Any]:
        """The RoundOpen's DP fields for a round of `participants` sampled nodes."""
        if not self.enabled:
            return {}
        return {"dp_clip": self.config.dp_clip, "dp_sigma": self.config.dp_noise_multiplier,
                "dp_participants": max(1, participants)}

    def eps(self, steps: int, accountant: str | None = None) -> float:
        c = self.config
        return epsilon(sigma=c.dp_noise_multiplier, q=c.dp_sample_rate, steps=steps,
                       delta=c.dp_delta, accountant=accountant or c.dp_accountant)

    def on_commit(self, round_: int) -> dict[str, Any] | None:
        """Account the committed round; its row (None without DP)."""
        if not self.enabled:
            return None
        self.steps += max(1, self.pending_draws)
        self.pending_draws = 0
        row = {"round": round_, "steps": self.steps, "epsilon": self.eps(self.steps, "rdp"),
               "epsilon_pld": self.eps(self.steps, "pld")}
        self.history.append(row)
        log.info("round %d: epsilon %.4g (RDP), %.4g (PLD) at delta %g after %d steps",
                 round_, row["epsilon"], row["epsilon_pld"], self.config.dp_delta, self.steps)
        return row

    def budget_spent(self) -> bool:
        """True when one more round would take epsilon past the budget (the run stops)."""
        budget = self.config.dp_epsilon_budget
        if not self.enabled or budget <= 0:
            return False
        if self.stop_reason is not None:
            return True
        nxt = self.eps(self.steps + 1)
        if nxt > budget:
            self.stop_reason = (f"privacy budget: one more round would spend epsilon "
                                f"{nxt:.4g} > {budget:g} ({self.config.dp_accountant}, delta "
                                f"{self.config.dp_delta:g}, {self.steps} steps so far)")
            log.warning("stopping the run: %s", self.stop_reason)
            return True
        return False

    def view(self) -> dict[str, Any]:
        c = self.config
        last = self.history[-1] if self.history else None
        eps_now = last["epsilon"] if last else (self.eps(self.steps, "rdp") if self.enabled
                                                 else None)
        return {"enabled": self.enabled, "clip": c.dp_clip, "noise_multiplier":
                c.dp_noise_multiplier, "sample_rate": c.dp_sample_rate, "delta": c.dp_delta,
                "accountant": c.dp_accountant, "epsilon_budget": c.dp_epsilon_budget or None,
                "steps": self.steps, "epsilon": eps_now,
                "epsilon_pld": last["epsilon_pld"] if last else None,
                "stop_reason": self.stop_reason, "per_round": self.history[-100:]}
