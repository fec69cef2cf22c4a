"""Peer-to-peer reduction of one round's updates (reduce-scatter / all-gather), sans I/O.

The pieces the `p2p` exchange topology is built from, as pure state machines (stdlib only,
so a browser tab runs the same code): no sockets, no clocks. Callers feed them what arrived
and send what they return.

    plan = make_plan(round_, members, n_params, replicas=2)     # the server decides it
    peer = ShardReducer(me, plan, my_update, rule="median", byzantine_fraction=0.2,
                        result_codec="fp16")
    out = peer.start()              # [{"kind": "part", "to", "shard", "payload"}, ...]
    out = peer.on_part(sender, shard, payload)   # may emit "result" (to the server and,
                                                 # from the primary, to every member)
    out = peer.on_result(shard, payload)         # the all-gather: shards reduced by others
    peer.aggregate()                             # once peer.done

    check = ShardCheck(plan, result_codec="fp16")     # the server's side: owners' results
    actions = check.on_result(owner, shard, payload)   # agreed / mismatch (+ extra owner) / liar

The flat vector (n_params float32) is cut into S = len(members) contiguous shards, fixed for
the round (`shard_bounds`; the plan lives in shared.p2p_plan and is re-exported here).
Shard s is reduced by `replicas` owners, members[(s + k) % n] for k = 0.. (k = 0 is the
primary). Every member sends its slice of s to each owner of s (float32
LE); an owner applies the round's rule to the slices of ALL members, in member order, and
encodes the result with the round's result codec (RESULT_CODECS: element-wise and
deterministic, so honest owners get bit-identical payloads; coordinate-wise rules only:
COORDINATE_RULES). Each owner reports its reduced shard to the server and keeps it; the
primary also sends it to every member that does not own it. The aggregate everyone applies,
the server included, is the decoded results.

Bytes per peer and round, as a share of its update U (n members, r owners per shard, results
in fp16): slices out r(n-1)/n U, results out (n-r)/n U/2 for a primary, and as much in; with
raw32 results the second term is (n-r)/n U. fp16 rounds each aggregate coordinate to 11
significant bits (relative error <= 2^-11); bench.transport --quality measures what it costs.

Lying owners: the server compares the owners' results of a shard (ShardCheck). If they differ
it adds another member as an extra owner (`revise(plan, extra=...)`), which gets the slices
from everyone and reduces the shard too; the majority result stands and each owner whose
result differs from it is reported as a liar. Vanished peers: `revise(plan, gone=...)` drops
them from the members (their update is left out of the round) and hands the shards they owned
to the next members in the ring; peers resend only what the new owners lack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from shared.aggregation import estimate_f, get_rule
from shared.codecs import decode_update, get_codec
from shared.errors import BadUpdate
from shared.messages import RESULT_CODECS, sha256_hex
from shared.p2p_plan import (  # re-exported: the plan's home was this module
    Plan,
    check_plan,
    make_plan,
    next_owner,
    prefer_primaries,
    revise,
    shard_bounds,
)
from shared.p2p_stream import ack_event, check_piece, update_bytes
from shared.vec import Vector, all_finite, from_bytes, numpy_module, to_bytes

__all__ = ["COORDINATE_RULES", "MALFORMED", "Event", "MalformedResult", "Plan", "ShardCheck",
           "ShardKernel", "ShardReducer", "check_plan", "check_result_codec", "decode_result",
           "encode_result", "join_results", "make_plan", "next_owner", "prefer_primaries",
           "reduce_shard", "revise", "shard_bounds", "shard_f"]

COORDINATE_RULES = ("mean", "median", "trimmed-mean")  # per-coordinate: work per shard
MALFORMED = "malformed"  # ShardCheck's vote for an owner's result that does not decode
Event = dict[str, Any]


def shard_f(rule: str, n: int, byzantine_fraction: float) -> int:
    """The f the round's rule is applied with over `n` members' slices."""
    if rule not in COORDINATE_RULES:
        raise ValueError(f"p2p reduction needs a coordinate-wise rule {COORDINATE_RULES}, "
                         f"not {rule!r}")
    return max(estimate_f(n, byzantine_fraction, rule=rule), 0)


def reduce_shard(rule: str, parts: Sequence[Vector], *, byzantine_fraction: float) -> Vector:
    """The round's rule over one shard's slices (in member order); f from the member count."""
    return get_rule(rule)(parts, f=shard_f(rule, len(parts), byzantine_fraction))


# A platform's reduce-and-encode of one shard (the tab's JS loops, browser/node/p2p_kernels.js):
# (rule, f, result codec, the members' float32 LE slices in member order) -> the result payload,
# byte-identical with encode_result(reduce_shard(...)) (tests/test_p2p_tabs.py checks the rules)
ShardKernel = Callable[[str, int, str, list[bytes]], bytes]


def check_result_codec(codec: str) -> str:
    if codec not in RESULT_CODECS:
        raise ValueError(f"result codec must be one of {RESULT_CODECS}, not {codec!r}")
    return codec


def encode_result(vec: Vector, codec: str) -> bytes:
    """A reduced shard as a `codec` payload (saturating at the codec's range)."""
    return get_codec(check_result_codec(codec)).encode(vec)


class MalformedResult(ValueError):
    """A reduced shard that is not `length` finite values of the round's result codec."""


def decode_result(payload: bytes, length: int, codec: str) -> Vector:
    """A reduced shard back to float32; MalformedResult (a ValueError) unless it is `length`
    finite values of `codec`."""
    try:
        return decode_update(payload, length, expect=codec)
    except BadUpdate as exc:
        raise MalformedResult(f"reduced shard: {exc}") from None


class ShardReducer:
    """One peer's side of the exchange: sends its slices, reduces the shards it owns, and
    assembles the aggregate from the shards the primaries serve."""

    def __init__(self, me: str, plan: Plan, update: Vector, *, rule: str,
                 byzantine_fraction: float = 0.0, result_codec: str = "raw32",
                 kernel: ShardKernel | None = None, stream: bool = False) -> None:
        if len(update) != plan.n_params:
            raise ValueError(f"update has {len(update)} values, the plan {plan.n_params}")
        if me not in plan.members:
            raise ValueError("this peer is not a member of the plan")
        if rule not in COORDINATE_RULES:
            raise ValueError(f"p2p needs a coordinate-wise rule {COORDINATE_RULES}")
        self.me, self.plan, self.rule = me, plan, rule
        self.fraction, self.result_codec = byzantine_fraction, check_result_codec(result_codec)
        self.raw: bytes | memoryview = update_bytes(update) if stream else to_bytes(update)
        self.parts: dict[int, dict[str, bytes]] = {}  # shard -> member -> slice (owned)
        self.reduced: dict[int, bytes] = {}  # shard -> my reduction (owned shards)
        self.shards: dict[int, bytes] = {}  # shard -> reduction: mine if I own it, else served
        self.sent: set[tuple[int, str]] = set()  # (shard, owner) slices already sent
        self._members = plan.members  # the member set the reductions so far are over
        self.kernel = kernel  # None: shared.aggregation's rule + shared.codecs here
        self.bytes_out = self.bytes_in = 0
        # streamed runs (shared.p2p_stream): pieces of a shard are dropped once it is reduced,
        # the owner acknowledges each piece then (ACK events), and a bad piece gets a typed
        # error (BadChunk / DuplicateChunk / ForeignChunk) that leaves every reduction as it was
        self.stream = stream
        self.held_bytes = self.peak_held_bytes = 0  # others' pieces held, now and at most

    def _slice(self, shard: int) -> bytes:
        lo, hi = self.plan.bounds(shard)
        return bytes(self.raw[4 * lo:4 * hi])  # no copy of a bytes slice; streamed: a piece

    def _own_slice(self, shard: int) -> bytes | memoryview:
        if not self.stream or self.kernel is not None:
            return self._slice(shard)
        lo, hi = self.plan.bounds(shard)
        return memoryview(self.raw)[4 * lo:4 * hi]  # held as a view: no copy of our update

    def _sends(self) -> list[Event]:
        out: list[Event] = []
        for s, own in enumerate(self.plan.owners):
            for o in own:
                if (s, o) in self.sent:
                    continue
                self.sent.add((s, o))
                if o == self.me:
                    out += self._store(self.me, s, self._own_slice(s))
                else:
                    payload = self._own_slice(s)  # streamed: a view, sent (and cut) later
                    self.bytes_out += len(payload)
                    out.append({"kind": "part", "to": o, "shard": s, "payload": payload})
        return out

    def start(self) -> list[Event]:
        return self._sends()

    def on_part(self, sender: str, shard: int, payload: bytes) -> list[Event]:
        """A member's slice of a shard we own. Wrong sizes, strangers and unowned shards raise
        ValueError (the caller answers the sender with a typed error); streamed, typed
        BadChunk errors (shared.p2p_stream.check_piece), duplicates included."""
        if self.stream:
            check_piece(self.plan, self.me, self.reduced, self.parts, sender, shard, payload)
            self.bytes_in += len(payload)
            self.held_bytes += len(payload)
            self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
            return self._store(sender, shard, bytes(payload))
        if sender not in self.plan.members:
            raise ValueError(f"part from {sender[:12]}, not a member of the plan")
        if not 0 <= shard < self.plan.n_shards or self.me not in self.plan.owners[shard]:
            raise ValueError(f"part for shard {shard}, which this peer does not own")
        lo, hi = self.plan.bounds(shard)
        if len(payload) != 4 * (hi - lo):
            raise ValueError(f"shard {shard} part has {len(payload)} bytes, not {4 * (hi - lo)}")
        vec = from_bytes(bytes(payload))
        if not all_finite(vec):
            raise ValueError(f"shard {shard} part from {sender[:12]} is not finite")
        self.bytes_in += len(payload)
        return self._store(sender, shard, bytes(payload))

    def _store(self, sender: str, shard: int, payload: bytes | memoryview) -> list[Event]:
        # streamed: our own slices are views of our update (bytes-like, read only, no copy)
        self.parts.setdefault(shard, {})[sender] = cast(bytes, payload)
        return self._reduce_ready()

    def _reduce_ready(self) -> list[Event]:
        out: list[Event] = []
        for s in self.plan.owned_by(self.me):
            got = self.parts.get(s, {})
            if s in self.reduced or not all(m in got for m in self.plan.members):
                continue
            if self.kernel is not None:
                f = shard_f(self.rule, len(self.plan.members), self.fraction)
                res = self.kernel(self.rule, f, self.result_codec,
                                  [got[m] for m in self.plan.members])
            else:
                vecs = [from_bytes(got[m]) for m in self.plan.members]
                res = encode_result(reduce_shard(self.rule, vecs,
                                                 byzantine_fraction=self.fraction),
                                    self.result_codec)
            self.reduced[s] = self.shards[s] = res  # an owner keeps its own reduction
            digest = sha256_hex(res)
            if self.stream:  # the pieces are done with: acknowledge and drop them
                out += [ack_event(m, s, got[m]) for m in self.plan.members if m != self.me]
                self.held_bytes -= sum(len(got[m]) for m in got if m != self.me)
                del self.parts[s]
            out.append({"kind": "result", "to": "server", "shard": s, "payload": res,
                        "digest": digest})
            own = self.plan.owners[s]
            if own[0] == self.me:  # the primary serves it to every member not reducing it
                for m in self.plan.members:
                    if m not in own:
                        self.bytes_out += len(res)
                        out.append({"kind": "result", "to": m, "shard": s, "payload": res,
                                    "digest": digest})
        return out

    def on_result(self, shard: int, payload: bytes) -> list[Event]:
        """A primary's reduced shard (the all-gather). Checked against the server's agreed
        digests by the caller once the server has them (`check_against`). An owner keeps its
        own reduction of the shard."""
        if not 0 <= shard < self.plan.n_shards:
            raise ValueError(f"result for shard {shard}, out of range")
        lo, hi = self.plan.bounds(shard)
        decode_result(bytes(payload), hi - lo, self.result_codec)  # ValueError if unusable
        self.bytes_in += len(payload)
        if shard not in self.reduced:  # an owner keeps its own
            self.shards[shard] = bytes(payload)
        return []

    def revise(self, plan: Plan) -> list[Event]:
        """A new plan for the same round: drop what came from members that left, send our
        slices to new owners, reduce shards that are now complete."""
        if plan.round != self.plan.round or plan.n_shards != self.plan.n_shards:
            raise ValueError("a revision must keep the round and its shards")
        self.plan = plan
        if self.me not in plan.members:
            return []
        if plan.members != self._members:  # every reduction changes: start them over
            keep = set(plan.members)
            self.parts = {s: {m: p for m, p in got.items() if m in keep}
                          for s, got in self.parts.items()}
            if self.stream:  # reduced pieces were dropped: every member sends all again
                self.parts, self.sent, self.held_bytes = {}, set(), 0
            self.reduced.clear()
            self.shards.clear()
            self._members = plan.members
        return self._sends() + self._reduce_ready()

    def check_against(self, digests: dict[int, str]) -> list[int]:
        """Shards whose served result does not match the server's agreed digest (fetch those
        again, from another owner or the server)."""
        return [s for s, d in digests.items() if sha256_hex(self.shards.get(s, b"")) != d]

    @property
    def done(self) -> bool:
        return len(self.shards) == self.plan.n_shards

    def aggregate(self) -> Vector:
        if not self.done:
            raise ValueError(f"{self.plan.n_shards - len(self.shards)} shards missing")
        return join_results(self.plan, [self.shards[s] for s in range(self.plan.n_shards)],
                            self.result_codec)


def join_results(plan: Plan, payloads: Sequence[bytes], codec: str) -> Vector:
    """The aggregate: every shard's result decoded, in shard order."""
    out = bytearray(4 * plan.n_params)  # filled in place: the aggregate's only copy
    for s, payload in enumerate(payloads):
        lo, hi = plan.bounds(s)
        out[4 * lo:4 * hi] = to_bytes(decode_result(payload, hi - lo, codec))
    np = numpy_module()
    return np.frombuffer(out, dtype="<f4") if np is not None else from_bytes(out)


class ShardCheck:
    """The server's side: collects each owner's reduced shard, decides when owners agree,
    and when they do not, asks for another owner and names the liars once a majority exists."""

    def __init__(self, plan: Plan, *, result_codec: str = "raw32") -> None:
        self.plan, self.result_codec = plan, check_result_codec(result_codec)
        self.results: dict[int, dict[str, str]] = {}  # shard -> owner -> digest
        self.payloads: dict[str, bytes] = {}  # digest -> payload
        self.agreed: dict[int, str] = {}  # shard -> agreed digest
        self.liars: dict[str, list[int]] = {}  # owner -> shards it lied about
        self.members_revision = plan.revision  # results from this revision on still count
        self.bad_events: list[Event] = []  # what the last malformed result decided

    def on_result(self, owner: str, shard: int, payload: bytes) -> list[Event]:
        """Returns events: {"kind": "agreed", "shard"}, {"kind": "extra_owner", "shard",
        "node"} (revise the plan with it), {"kind": "liar", "node", "shard"}; ValueError for a
        shard the sender does not own. A result that does not decode raises MalformedResult,
        and still counts as that owner's vote, one that never wins: what that decided is in
        `bad_events` (an extra owner, then the owner named a liar)."""
        plan = self.plan
        self.bad_events = []
        if not 0 <= shard < plan.n_shards or owner not in plan.owners[shard]:
            raise ValueError(f"{owner[:12]} does not own shard {shard}")
        lo, hi = plan.bounds(shard)
        try:
            decode_result(bytes(payload), hi - lo, self.result_codec)
        except MalformedResult:  # an owner's unusable result: a vote no one can agree with
            self.results.setdefault(shard, {})[owner] = MALFORMED
            self.bad_events = self._decide(shard)
            raise
        digest = sha256_hex(payload)
        self.payloads.setdefault(digest, bytes(payload))
        self.results.setdefault(shard, {})[owner] = digest
        return self._decide(shard)

    def _decide(self, shard: int) -> list[Event]:
        if shard in self.agreed:
            return []
        own = self.plan.owners[shard]
        got = {o: d for o, d in self.results.get(shard, {}).items() if o in own}
        if len(got) < len(own):
            return []
        counts: dict[str, int] = {}
        for d in got.values():
            if d != MALFORMED:
                counts[d] = counts.get(d, 0) + 1
        best, votes = max(counts.items(), key=lambda kv: (kv[1], kv[0]), default=("", 0))
        if votes * 2 > len(got):  # a strict majority of the owners (all, with one owner)
            self.agreed[shard] = best
            out: list[Event] = [{"kind": "agreed", "shard": shard}]
            for o, d in got.items():
                if d != best:
                    self.liars.setdefault(o, []).append(shard)
                    out.append({"kind": "liar", "node": o, "shard": shard})
            return out
        node = next_owner(self.plan, shard)
        if node is None:  # every member reduced it and still no majority
            return [{"kind": "unresolved", "shard": shard}]
        return [{"kind": "extra_owner", "shard": shard, "node": node}]

    def revise(self, plan: Plan) -> list[Event]:
        """Adopt a revised plan; results of members that left no longer count, and shards
        whose member set changed must be reduced again."""
        changed = plan.members != self.plan.members
        self.plan = plan
        if changed:
            self.results.clear()
            self.agreed.clear()
            self.members_revision = plan.revision
        out: list[Event] = []
        for s in range(plan.n_shards):
            out += self._decide(s)
        return out

    @property
    def done(self) -> bool:
        return len(self.agreed) == self.plan.n_shards

    def aggregate(self) -> Vector:
        if not self.done:
            raise ValueError("not every shard is agreed")
        return join_results(self.plan, [self.payloads[self.agreed[s]]
                                        for s in range(self.plan.n_shards)], self.result_codec)

