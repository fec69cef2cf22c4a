"""Validation of candidate updates by their effect on held-out loss. Pure: no I/O.

A validator (the server, or a node started with `--role validator`) holds the round's
global params theta and a held-out probe set. For each candidate pseudo-gradient Delta_i
(= theta - the node's locally trained params) it measures

    base = loss(theta)            cand_i = loss(theta - Delta_i)

i.e. the node's own trained model, scored on data the node never saw. A poisoned update
(sign flip, scaled noise, label flipping) makes that model clearly worse than the others.
The yardstick is the WORSE of two references:

    ref = max(base, median_j cand_j)      reject when  cand_i > ref * (1 + threshold)

Early in a run every honest local model beats theta (base is the lenient reference); later
the global params, extrapolated by the outer Nesterov step, are often better than any single
node's local model, and the round's median candidate (an honest one while fewer than half
lie) is the fair reference. Measured on mlp-digits: honest local models were 8-16% worse
than theta by round 3, poisoned ones 35-130% worse. A candidate whose loss is not finite is
always rejected.

Several validators may score the same candidates; `combine` takes their verdicts and
rejects a candidate when a strict majority of the validators that scored it reject it
(one lying validator out of three cannot veto an honest update, nor pass a bad one).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Score", "Verdict", "combine", "judge", "reference", "rejected"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Score:
    """One validator's measurement of one candidate."""

    node_id: str  # the candidate's sender
    digest: str  # the candidate's payload digest
    loss: float | None  # held-out loss of theta - Delta (None: not finite)


@dataclass(frozen=True, kw_only=True, slots=True)
class Verdict:
    """One validator's decision on one candidate."""

    node_id: str  # the candidate's sender
    digest: str  # the candidate's payload digest
    ok: bool  # accepted by this validator
    reason: str  # why (human readable, recorded with a rejection)
    validator: str  # who judged ("server" or a validator node id)


def reference(base: float | None, losses: Iterable[float | None]) -> float | None:
    """max(base, median of the finite candidate losses); None when neither is finite."""
    finite = sorted(v for v in losses if v is not None and math.isfinite(v))
    refs = [v for v in (base, statistics.median(finite) if finite else None)
            if v is not None and math.isfinite(v)]
    return max(refs) if refs else None


def judge(*, ref: float | None, score: Score, threshold: float,
          validator: str = "server") -> Verdict:
    """Accept unless the candidate's held-out loss exceeds `ref` by more than `threshold`
    (relative); `ref` comes from `reference`."""
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    if score.loss is None or not math.isfinite(score.loss):
        return Verdict(node_id=score.node_id, digest=score.digest, ok=False,
                       reason="held-out loss is not finite", validator=validator)
    if ref is None or not math.isfinite(ref):
        return Verdict(node_id=score.node_id, digest=score.digest, ok=True,
                       reason="no finite reference loss; not judged", validator=validator)
    limit = ref + threshold * abs(ref)
    if score.loss > limit:
        worse = (score.loss - ref) / abs(ref) if ref else math.inf
        return Verdict(node_id=score.node_id, digest=score.digest, ok=False,
                       reason=f"held-out loss {score.loss:.4f} vs reference {ref:.4f} "
                              f"(+{worse:.1%}, limit +{threshold:.1%})",
                       validator=validator)
    return Verdict(node_id=score.node_id, digest=score.digest, ok=True,
                   reason=f"held-out loss {score.loss:.4f} vs reference {ref:.4f}",
                   validator=validator)


def combine(verdicts: Iterable[Verdict]) -> Mapping[tuple[str, str], list[Verdict]]:
    """Group verdicts by candidate (node id, digest). See `rejected` for the decision."""
    out: dict[tuple[str, str], list[Verdict]] = {}
    for v in verdicts:
        out.setdefault((v.node_id, v.digest), []).append(v)
    return out


def rejected(verdicts: Iterable[Verdict]) -> bool:
    """A strict majority of the validators that judged this candidate rejected it."""
    vs = list(verdicts)
    no = sum(1 for v in vs if not v.ok)
    return no * 2 > len(vs)
