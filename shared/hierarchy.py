"""Hierarchical aggregation, sans I/O: groups, two aggregators per group, group reduction.

The `p2p` topology with `p2p_groups = G > 0` (server/hierarchy.py) does not cut the update into
shards over all members: it splits the round's members into G groups and reduces each group at
two of its own members, the group's aggregators; the server only combines G group results.

    groups = make_groups(members, n_groups=G)       # the server: who is in which group
    plan = elect(round_, group, capable, avoid=liars)  # shared.p2p.Plan, 1 shard, 2 owners
    node = GroupReducer(me, plan, digests, update, rule="median", result_codec="fp16", ...)
    out = node.start()                 # [{"kind": "part", "to": aggregator, "payload"}]
    out = node.on_part(sender, payload)          # an aggregator: may emit the group result
    out = node.on_global(payload)      # the server's combined aggregate: forward to members
    node.on_forward(sender, payload)   # a member: the combined aggregate from an aggregator
    agg = combine(results, sizes, rule="median", byzantine_fraction=0.2)   # the server

Grouping (`make_groups`, deterministic): members sorted by (region label, node id), where the
label is what a node reports in its Hello features (`region=LABEL`, "" when none), then cut
into G contiguous groups whose sizes differ by at most one. Members of one region stay next
to each other, so with balanced regions a group never spans two. G is lowered until every
group has at least MIN_GROUP members and two capable ones (native nodes: browser tabs are
never aggregators).

Election (`elect`): a group's capable members sorted by node id and rotated by the round
number, members outvoted before moved to the end; the first two are the aggregators. The
group plan is a shared.p2p.Plan with one shard (the whole vector) owned by them, so the
server checks them with shared.p2p.ShardCheck (digests of the encoded results compared; on
disagreement another member reduces the group too and the majority stands) and replaces
vanished ones with shared.p2p.revise, like p2p shard owners.

Validation inside a group: every member's part must hash to the digest of its signed Ready
(the plan carries them), be `n_params` float32 values and finite, so a member cannot send its
two aggregators different updates. The group result is the run's coordinate-wise rule over
the group's updates (f from the group size), encoded in the round's result codec
(element-wise and deterministic: honest aggregators produce identical bytes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shared.aggregation import estimate_f, get_rule
from shared.messages import sha256_hex
from shared.p2p import COORDINATE_RULES, Plan, check_plan, decode_result, encode_result
from shared.vec import Vector, all_finite, from_bytes, numpy_module, to_bytes

MIN_GROUP = 3  # fewest members a group is made with (two aggregators and one to break ties)
Event = dict[str, Any]


@dataclass(frozen=True, kw_only=True, slots=True)
class Member:
    """What grouping needs of one member of the round."""

    node_id: str
    region: str = ""  # the label the node reported ("region=LABEL" in its Hello features)
    capable: bool = True  # may aggregate (a native node; browser tabs may not)


def region_of(features: Sequence[str] | frozenset[str]) -> str:
    """The region label in a node's Hello features ("region=eu-west" -> "eu-west")."""
    for f in sorted(features):
        if f.startswith("region="):
            return f[len("region="):]
    return ""


def make_groups(members: Sequence[Member], *, n_groups: int) -> list[list[Member]]:
    """`members` in at most `n_groups` groups (see the module doc); [] when no group can be
    formed (fewer than two capable members)."""
    if n_groups < 1:
        raise ValueError("n_groups must be >= 1")
    ordered = sorted(members, key=lambda m: (m.region, m.node_id))
    if len({m.node_id for m in ordered}) != len(ordered):
        raise ValueError("members must be distinct")
    g = min(n_groups, max(1, len(ordered) // MIN_GROUP))
    while g >= 1:
        groups = _cut(ordered, g)
        if all(sum(m.capable for m in grp) >= 2 for grp in groups):
            return groups
        g -= 1
    return []


def _cut(ordered: Sequence[Member], g: int) -> list[list[Member]]:
    base, extra = divmod(len(ordered), g)
    out, lo = [], 0
    for i in range(g):
        hi = lo + base + (1 if i < extra else 0)
        out.append(list(ordered[lo:hi]))
        lo = hi
    return out


def elect(round_: int, n_params: int, group: Sequence[Member], *, avoid: Sequence[str] = (),
          aggregators: int = 2) -> Plan:
    """The group's plan for `round_`: a shared.p2p.Plan over its members with one shard owned
    by `aggregators` capable members (rotation by round; members in `avoid` last)."""
    capable = sorted(m.node_id for m in group if m.capable)
    if len(capable) < min(2, aggregators):
        raise ValueError("a group needs two capable members")
    k = round_ % len(capable)
    rotated = capable[k:] + capable[:k]
    bad = set(avoid)
    ordered = sorted(rotated, key=lambda n: n in bad)  # stable: rotation kept otherwise
    plan = Plan(round=round_, n_params=n_params,
                members=tuple(sorted(m.node_id for m in group)),
                owners=(tuple(ordered[:aggregators]),))
    check_plan(plan)
    return plan


def next_aggregator(plan: Plan, capable: Sequence[str], avoid: Sequence[str] = ()
                    ) -> str | None:
    """A capable member that is not yet an aggregator (members outvoted before last)."""
    free = [c for c in sorted(capable) if c in plan.members and c not in plan.owners[0]]
    free.sort(key=lambda n: n in set(avoid))
    return free[0] if free else None


def plan_dict(plan: Plan, *, group: int, n_groups: int, digests: Mapping[str, str],
              report_s: float = 0.0) -> dict[str, Any]:
    """The ShardPlan `plan` field of a group plan: shared.p2p.Plan.to_dict() plus the group's
    index, the number of groups, each member's Ready digest and `report_s` (an aggregator
    still lacking updates that long after the plan reports which; 0: never)."""
    return {**plan.to_dict(), "group": group, "n_groups": n_groups,
            "digests": {m: digests[m] for m in plan.members}, "report_s": report_s}


def is_group_plan(d: Mapping[str, Any]) -> bool:
    return "group" in d and "digests" in d


def parse_plan(d: Mapping[str, Any]) -> tuple[Plan, int, dict[str, str]]:
    """(plan, group index, member -> digest) of a group plan dict; ValueError if malformed."""
    plan = Plan.from_dict(dict(d))
    if plan.n_shards != 1:
        raise ValueError("a group plan has exactly one shard")
    digests = {str(k): str(v) for k, v in dict(d["digests"]).items()}
    if set(digests) != set(plan.members):
        raise ValueError("a group plan needs one digest per member")
    group = int(d["group"])
    if not 0 <= group < int(d["n_groups"]):
        raise ValueError("group index out of range")
    return plan, group, digests


def encode_missing(ids: Sequence[str]) -> bytes:
    """An aggregator's report of the members whose update it lacks: their ids (64 hex each),
    concatenated (a `Shard` "part" to the server; 64 bytes an id keep it float32-sized)."""
    return "".join(ids).encode("ascii")


def decode_missing(payload: bytes, members: Sequence[str]) -> set[str]:
    """The ids of a missing-update report; ValueError unless they are members."""
    text = bytes(payload).decode("ascii", errors="replace")
    if not text or len(text) % 64:
        raise ValueError("a missing-update report is whole 64-character node ids")
    ids = {text[i:i + 64] for i in range(0, len(text), 64)}
    if not ids <= set(members):
        raise ValueError("a missing-update report names nodes outside the group")
    return ids


def accused(owners: Sequence[str], reports: Mapping[str, set[str]]) -> set[str]:
    """Members every other aggregator reported missing (at least one report): their updates
    never came, so they leave the group. An aggregator that holds a member's update does
    not report it, so no aggregator alone can have an honest member dropped."""
    out: set[str] = set()
    for m in set().union(*reports.values()) if reports else set():
        others = [a for a in owners if a != m]
        if others and all(m in reports.get(a, set()) for a in others):
            out.add(m)
    return out


def reduce_group(rule: str, updates: Sequence[Vector], *, byzantine_fraction: float) -> Vector:
    """The run's coordinate-wise rule over a group's updates (in member order)."""
    if rule not in COORDINATE_RULES:
        raise ValueError(f"hierarchical reduction needs a coordinate-wise rule "
                         f"{COORDINATE_RULES}, not {rule!r}")
    f = estimate_f(len(updates), byzantine_fraction, rule=rule)
    return get_rule(rule)(updates, f=max(f, 0))


def combine(results: Sequence[Vector], sizes: Sequence[int], *, rule: str,
            byzantine_fraction: float) -> Vector:
    """The server's rule over the group results: `mean` weighs each group by its member
    count (so that it equals the flat mean); the other rules treat groups alike, with f from
    the number of groups."""
    if not results or len(results) != len(sizes):
        raise ValueError("one size per group result, at least one")
    if rule == "mean":
        total = float(sum(sizes))
        np = numpy_module()
        if np is not None:
            stack = np.stack([np.asarray(r, dtype=np.float64) for r in results])
            w = np.asarray(sizes, dtype=np.float64) / total
            return np.asarray(w @ stack, dtype=np.float32)
        n = len(results[0])
        acc = [0.0] * n
        for vec, size in zip(results, sizes, strict=True):
            w = size / total
            for i, v in enumerate(vec):
                acc[i] += w * v
        return from_bytes(to_bytes(acc))
    return reduce_group(rule, results, byzantine_fraction=byzantine_fraction)


class GroupReducer:
    """One member's side of its group's reduction; an aggregator also reduces and forwards."""

    def __init__(self, me: str, plan: Plan, digests: Mapping[str, str], update: Vector, *,
                 rule: str, byzantine_fraction: float = 0.0, result_codec: str = "fp16"
                 ) -> None:
        if me not in plan.members:
            raise ValueError("this node is not a member of the group")
        if len(update) != plan.n_params:
            raise ValueError(f"update has {len(update)} values, the plan {plan.n_params}")
        self.me, self.plan, self.digests = me, plan, dict(digests)
        self.rule, self.fraction, self.result_codec = rule, byzantine_fraction, result_codec
        self.raw = to_bytes(update)
        if sha256_hex(self.raw) != self.digests.get(me):
            raise ValueError("our update does not match the digest the plan holds for us")
        self.parts: dict[str, bytes] = {me: self.raw}  # member -> update (as an aggregator)
        self.sent: set[str] = set()  # aggregators our update went to
        self.result: bytes | None = None  # our group result (as an aggregator)
        self.global_: bytes | None = None  # the combined aggregate, once it came
        self.forwarded = False
        self.bytes_out = self.bytes_in = 0

    @property
    def aggregating(self) -> bool:
        return self.me in self.plan.owners[0]

    def start(self) -> list[Event]:
        out: list[Event] = []
        for a in self.plan.owners[0]:
            if a != self.me and a not in self.sent:
                self.sent.add(a)
                self.bytes_out += len(self.raw)
                out.append({"kind": "part", "to": a, "payload": self.raw})
        return out + self._reduce_ready()

    def on_part(self, sender: str, payload: bytes) -> list[Event]:
        """A member's update; ValueError (answered as refused) unless this node aggregates
        the group and it is that member's update as its Ready declared."""
        if not self.aggregating:
            raise ValueError("part sent to a node that does not aggregate this group")
        if sender not in self.plan.members:
            raise ValueError(f"part from {sender[:12]}, not a member of the group")
        data = bytes(payload)
        if len(data) != 4 * self.plan.n_params:
            raise ValueError(f"part has {len(data)} bytes, not {4 * self.plan.n_params}")
        if sha256_hex(data) != self.digests[sender]:
            raise ValueError(f"part from {sender[:12]} does not match its Ready digest")
        if not all_finite(from_bytes(data)):
            raise ValueError(f"part from {sender[:12]} is not finite")
        self.bytes_in += len(data)
        self.parts[sender] = data
        return self._reduce_ready()

    def _reduce_ready(self) -> list[Event]:
        if not self.aggregating or self.result is not None:
            return []
        if not all(m in self.parts for m in self.plan.members):
            return []
        vecs = [from_bytes(self.parts[m]) for m in self.plan.members]
        res = reduce_group(self.rule, vecs, byzantine_fraction=self.fraction)
        if not all_finite(res):
            raise ValueError("the group result is not finite")
        self.result = encode_result(res, self.result_codec)
        return [{"kind": "result", "to": "server", "payload": self.result,
                 "digest": sha256_hex(self.result)}]

    def revise(self, plan: Plan) -> list[Event]:
        """A new plan for the same round: members that left are dropped (the result is
        computed again without them), new aggregators get our update."""
        if plan.round != self.plan.round:
            raise ValueError("a revision must keep the round")
        if plan.members != self.plan.members:
            self.parts = {m: p for m, p in self.parts.items() if m in plan.members}
            self.result = None
        elif self.me in plan.owners[0] and self.me not in self.plan.owners[0]:
            self.result = None
        self.plan = plan
        if self.me not in plan.members:
            return []
        return self.start()

    def on_global(self, payload: bytes) -> list[Event]:
        """The server's combined aggregate (to an aggregator): kept and forwarded to every
        member that does not aggregate (they get it from each aggregator; the first counts)."""
        decode_result(bytes(payload), self.plan.n_params, self.result_codec)
        self.global_ = bytes(payload)
        if self.forwarded:
            return []
        self.forwarded = True
        out = []
        for m in self.plan.members:
            if m not in self.plan.owners[0]:
                self.bytes_out += len(payload)
                out.append({"kind": "result", "to": m, "payload": self.global_})
        return out

    def on_forward(self, sender: str, payload: bytes) -> None:
        """The combined aggregate from one of our aggregators (its correctness is checked by
        the next RoundOpen's params digest)."""
        if sender not in self.plan.owners[0]:
            raise ValueError(f"aggregate from {sender[:12]}, not an aggregator of the group")
        decode_result(bytes(payload), self.plan.n_params, self.result_codec)
        self.bytes_in += len(payload)
        if self.global_ is None:
            self.global_ = bytes(payload)

    def missing(self) -> list[str]:
        """Members whose update this aggregator still lacks ([] when not aggregating)."""
        if not self.aggregating or self.result is not None:
            return []
        return [m for m in self.plan.members if m not in self.parts]

    def aggregate(self) -> Vector | None:
        if self.global_ is None:
            return None
        return decode_result(self.global_, self.plan.n_params, self.result_codec)

