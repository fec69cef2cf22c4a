"""One iterative, parallel Kademlia lookup as pure state (DhtNode drives it).

The shortlist starts with the k contacts of the routing table nearest the target (depth 1).
At most `alpha` FindNode queries are in flight; each answer adds the records it carries at
depth (answerer's depth + 1). A record the node does not hold yet joins unverified and has
its signature checked only when the lookup is about to query it: most candidates never are,
and a check costs ~0.2 ms (a forged one is dropped then, as a failed candidate). The lookup
ends when the k nearest candidates that have not failed have all answered, or, for a node
lookup with `stop_on_found`, as soon as the target itself answers. Hops = the depth of the
target when it answered: 1 when the asker knew it already, 2 when one node's answer named
it, and so on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.dht.record import PeerRecord

FRESH, INFLIGHT, DONE, FAILED = range(4)


@dataclass(slots=True)
class Candidate:
    record: PeerRecord  # the newest record of the candidate heard so far
    dist: int  # XOR distance to the target
    depth: int  # 1 for the seeds, answerer's depth + 1 for a node named in an answer
    state: int = FRESH  # FRESH, INFLIGHT, DONE (answered) or FAILED (timed out, forged)
    verified: bool = True  # False: its signature is checked before it is queried


@dataclass(frozen=True, kw_only=True, slots=True)
class LookupResult:
    lookup_id: int  # the id lookup() returned
    target: str  # the id looked up, 64 hex
    purpose: str  # "user", "join", "refresh" or "random"
    found: bool  # the node with id `target` answered during the lookup
    hops: int | None  # its depth when it answered (None when not found)
    queries: int  # FindNode requests sent, retransmissions included
    closest: tuple[PeerRecord, ...]  # the k nearest nodes that answered, nearest first
    started: float  # clock of the node when it began
    finished: float  # and when it ended


@dataclass(slots=True)
class Lookup:
    lookup_id: int
    target: int
    purpose: str
    started: float
    stop_on_found: bool
    cands: dict[str, Candidate] = field(default_factory=dict)  # node id -> candidate
    inflight: int = 0
    queries: int = 0
    found_depth: int | None = None
    finished: bool = False

    def add(self, rec: PeerRecord, depth: int, *, verified: bool = True) -> None:
        held = self.cands.get(rec.node_id)
        if held is None:
            self.cands[rec.node_id] = Candidate(rec, rec.key ^ self.target, depth,
                                                verified=verified)
        elif rec.seq > held.record.seq and held.state in (FRESH, FAILED):
            # a newer record (new addresses) gives a candidate that failed another chance
            held.record, held.verified, held.state = rec, verified, FRESH

    def nearest(self, k: int) -> list[Candidate]:
        live = [c for c in self.cands.values() if c.state != FAILED]
        live.sort(key=lambda c: c.dist)
        return live[:k]

    def to_query(self, k: int, alpha: int) -> list[Candidate]:
        """Candidates to query now (marked INFLIGHT by the caller), nearest first."""
        room = alpha - self.inflight
        if room <= 0:
            return []
        return [c for c in self.nearest(k) if c.state == FRESH][:room]

    def is_done(self, k: int) -> bool:
        if self.stop_on_found and self.found_depth is not None:
            return True
        return self.inflight == 0 and all(c.state == DONE for c in self.nearest(k))

    def result(self, k: int, now: float) -> LookupResult:
        answered = [c.record for c in self.nearest(len(self.cands)) if c.state == DONE][:k]
        return LookupResult(lookup_id=self.lookup_id, target=f"{self.target:064x}",
                            purpose=self.purpose, found=self.found_depth is not None,
                            hops=self.found_depth, queries=self.queries,
                            closest=tuple(answered), started=self.started, finished=now)
