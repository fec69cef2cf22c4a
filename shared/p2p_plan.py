"""The plan of a `p2p` round: which contiguous shard of the flat update each member reduces
(sans I/O, stdlib only; shared.p2p's reducers and the server's ShardCheck work from it).

The flat vector (n_params float32) is cut into contiguous shards fixed for the round
(`shard_bounds`); shard s is reduced by `replicas` owners round the members' ring (the first
is the primary, which serves it). `revise` hands the shards of vanished members on and adds
extra owners for disputed shards; `prefer_primaries` puts owners caught lying last.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["Plan", "check_plan", "make_plan", "next_owner", "prefer_primaries", "revise",
           "shard_bounds"]


def shard_bounds(n_params: int, n_shards: int, shard: int) -> tuple[int, int]:
    """[lo, hi) of `shard`: sizes differ by at most one, the larger ones first."""
    if not 0 <= shard < n_shards or n_shards < 1:
        raise ValueError(f"shard {shard} out of range for {n_shards} shards")
    base, extra = divmod(n_params, n_shards)
    lo = shard * base + min(shard, extra)
    return lo, lo + base + (1 if shard < extra else 0)


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """Who reduces what in one round. `members` are the peers whose updates are reduced,
    sorted; `owners[s]` reduce shard s (owners[s][0]: the primary, which also serves it)."""

    round: int
    n_params: int
    members: tuple[str, ...]
    owners: tuple[tuple[str, ...], ...]
    revision: int = 0

    @property
    def n_shards(self) -> int:
        return len(self.owners)

    def bounds(self, shard: int) -> tuple[int, int]:
        return shard_bounds(self.n_params, self.n_shards, shard)

    def owned_by(self, node: str) -> list[int]:
        return [s for s, own in enumerate(self.owners) if node in own]

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "n_params": self.n_params, "members": list(self.members),
                "owners": [list(o) for o in self.owners], "revision": self.revision}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        plan = cls(round=int(d["round"]), n_params=int(d["n_params"]),
                   members=tuple(d["members"]), owners=tuple(tuple(o) for o in d["owners"]),
                   revision=int(d.get("revision", 0)))
        check_plan(plan)
        return plan


def check_plan(plan: Plan) -> None:
    """ValueError unless the plan is usable: sorted distinct members, every shard owned by
    members only, at least one owner each, and no more shards than floats."""
    m = plan.members
    if not m or list(m) != sorted(set(m)):
        raise ValueError("plan members must be distinct, sorted and not empty")
    if not 1 <= plan.n_shards <= plan.n_params:
        raise ValueError(f"{plan.n_shards} shards for {plan.n_params} params")
    for s, own in enumerate(plan.owners):
        if not own or len(set(own)) != len(own) or not set(own) <= set(m):
            raise ValueError(f"shard {s}: owners must be distinct members, at least one")


def make_plan(round_: int, members: Iterable[str], n_params: int, *, replicas: int = 2,
              max_shard: int = 0) -> Plan:
    """One shard per member; shard s owned by members[s], members[s+1], ... (`replicas` of
    them, fewer when there are fewer members). `max_shard` > 0 (streamed p2p runs): as many
    more shards as it takes for none to hold more than `max_shard` floats, dealt round the
    ring the same way (shard s owned by members[s % n], ...)."""
    ms = tuple(sorted(set(members)))
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    n = len(ms)
    if n == 0:
        raise ValueError("a plan needs at least one member")
    if max_shard < 0:
        raise ValueError("max_shard must be >= 0")
    k = min(replicas, n)
    n_shards = max(n, -(-n_params // max_shard)) if max_shard else n
    plan = Plan(round=round_, n_params=n_params, members=ms,
                owners=tuple(tuple(ms[(s + j) % n] for j in range(k))
                             for s in range(n_shards)))
    check_plan(plan)
    return plan


def revise(plan: Plan, *, gone: Iterable[str] = (), extra: dict[int, str] | None = None
           ) -> Plan:
    """The plan after peers left (`gone`: dropped from members and owners; a shard left with
    fewer owners than before gets the next members in the ring) and with extra owners for
    disputed shards (`extra`: shard -> member). Shard bounds never change within a round."""
    gone_set = set(gone)
    members = tuple(m for m in plan.members if m not in gone_set)
    if not members:
        raise ValueError("every member is gone")
    owners = []
    for s, own in enumerate(plan.owners):
        kept = [o for o in own if o not in gone_set]
        want = min(len(own), len(members))
        i = s
        while len(kept) < want:  # the next members in the ring, from the shard's position
            cand = members[i % len(members)]
            if cand not in kept:
                kept.append(cand)
            i += 1
        if extra and s in extra:
            if extra[s] not in members:
                raise ValueError(f"extra owner of shard {s} is not a member")
            if extra[s] not in kept:
                kept.append(extra[s])
        owners.append(tuple(kept))
    new = replace(plan, members=members, owners=tuple(owners), revision=plan.revision + 1)
    check_plan(new)
    return new


def prefer_primaries(plan: Plan, avoid: Iterable[str]) -> Plan:
    """The same plan with, for each shard, an owner not in `avoid` (e.g. members caught lying
    in earlier rounds) moved to the front, so that it is the one serving the shard. The set of
    owners does not change, so a liar still reduces and is still checked."""
    bad = set(avoid)
    owners = tuple(tuple(sorted(own, key=lambda o: o in bad)) for own in plan.owners)
    return plan if owners == plan.owners else replace(plan, owners=owners)


def next_owner(plan: Plan, shard: int) -> str | None:
    """The member that should reduce `shard` next (not yet an owner), or None."""
    n = len(plan.members)
    for j in range(n):
        cand = plan.members[(shard + j) % n]
        if cand not in plan.owners[shard]:
            return cand
    return None
