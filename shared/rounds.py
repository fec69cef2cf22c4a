"""The round state machine: which updates count, and when a round closes. Pure: no I/O,
the clock is passed in.

One outer round goes open -> collect -> (commit | retry). It commits when every active
participant has submitted and there are at least `quorum` updates, or at the deadline with at
least `quorum`. Below quorum at the deadline it is retried: the same round number, attempt+1,
a fresh deadline, the updates already received kept. It is never committed on too few.

Validators may exclude updates at commit time (`exclude`): an excluded node has answered the
round (it is not waited for), its update is gone from the aggregate, and a resubmission of it
is refused with `UpdateRejected`. If that leaves the round below quorum it is retried.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass, field

from shared.errors import ConflictingUpdate, UpdateRejected, WrongRound


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundPolicy:
    quorum: int = 1  # fewest updates a round may be committed with
    deadline_s: float = 60.0  # collection window of one attempt, seconds

    def __post_init__(self) -> None:
        if self.quorum < 1:
            raise ValueError(f"quorum must be >= 1, got {self.quorum}")
        if not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {self.deadline_s}")


class Decision(enum.Enum):
    WAIT = "wait"  # keep collecting
    COMMIT = "commit"  # aggregate what we have
    RETRY = "retry"  # deadline passed below quorum: extend, keep the updates


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # same (round, node, digest) seen before: counted once


@dataclass(kw_only=True)
class RoundState:
    round: int  # outer round number
    policy: RoundPolicy  # quorum + deadline
    opened_at: float  # clock time the current attempt opened
    attempt: int = 0  # retries so far
    closed: bool = False  # no more submissions once the commit has begun
    updates: dict[str, str] = field(default_factory=dict)  # node id -> payload digest
    excluded: dict[str, str] = field(default_factory=dict)  # node id -> reason (validation)

    @property
    def deadline_at(self) -> float:
        return self.opened_at + self.policy.deadline_s

    def remaining(self, now: float) -> float:
        return max(0.0, self.deadline_at - now)

    def check(self, *, node_id: str, round_: int, digest: str) -> Outcome:
        """What `submit` would answer, without recording: run it BEFORE decoding a payload."""
        if round_ != self.round or (self.closed and node_id not in self.updates):
            state = "closed" if round_ < self.round or self.closed else "not open yet"
            raise WrongRound(f"round {round_} is {state}; the current round is {self.round}"
                             + (" (closing)" if self.closed else ""), field="round")
        if node_id in self.excluded:
            raise UpdateRejected(f"your update for round {round_} was rejected: "
                                 f"{self.excluded[node_id]}", field="payload")
        seen = self.updates.get(node_id)
        if seen is None:
            return Outcome.ACCEPTED
        if seen == digest:
            return Outcome.DUPLICATE
        raise ConflictingUpdate(f"node already submitted a different update for round "
                                f"{round_}", field="digest")

    def submit(self, *, node_id: str, round_: int, digest: str) -> Outcome:
        """Record an update; the idempotency key is (round, node, digest)."""
        outcome = self.check(node_id=node_id, round_=round_, digest=digest)
        if outcome is Outcome.ACCEPTED:
            self.updates[node_id] = digest
        return outcome

    def decide(self, now: float, active: Collection[str]) -> Decision:
        """What to do now, given the ids of the participants still connected."""
        have = len(self.updates)
        if have >= self.policy.quorum and all(n in self.updates or n in self.excluded
                                              for n in active):
            return Decision.COMMIT
        if now >= self.deadline_at:
            return Decision.COMMIT if have >= self.policy.quorum else Decision.RETRY
        return Decision.WAIT

    def exclude(self, node_id: str, reason: str) -> None:
        """Drop `node_id`'s update from this round (validators rejected it)."""
        self.updates.pop(node_id, None)
        self.excluded[node_id] = reason

    def retry(self, now: float) -> None:
        """Open the next attempt of the same round; received updates stay."""
        self.attempt += 1
        self.opened_at = now
