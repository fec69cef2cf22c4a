"""The XOR metric and the routing table: 256 k-buckets with ping-before-evict.

Ids are 256-bit integers (node id = SHA-256 of the ML-DSA-65 public key). distance(a, b) =
a XOR b; bucket i of a node holds the contacts whose distance to it lies in [2^i, 2^(i+1)),
so bucket 255 covers half the id space and bucket 0 one id. Each bucket keeps at most k
contacts, least recently seen first, plus a replacement cache of up to k newcomers.

A newcomer for a full bucket is never let in by pushing out a live contact: the table puts it
in the replacement cache and asks the caller to PING the least recently seen contact
(`update` returns it). An answer moves that contact to the tail (long-lived contacts are the
best predictor of future uptime); a timeout (`failed`) evicts it and promotes the newest
replacement. Contacts that miss `max_fails` RPCs in a row are evicted the same way (one miss
is enough when a replacement is waiting).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from shared.dht.record import PeerRecord

ID_BITS = 256


def distance(a: int, b: int) -> int:
    return a ^ b


def bucket_index(own: int, other: int) -> int:
    """Which bucket of `own` holds `other` (-1 for itself)."""
    return (own ^ other).bit_length() - 1


def random_id_in_bucket(own: int, index: int, rng: random.Random) -> int:
    """A random id whose distance to `own` lies in [2^index, 2^(index+1))."""
    low = rng.getrandbits(index) if index > 0 else 0
    return own ^ ((1 << index) | low)


def id_hex(key: int) -> str:
    return f"{key:064x}"


@dataclass(slots=True)
class Contact:
    record: PeerRecord  # the newest verified record (addresses come from it)
    key: int  # record.node_id as an integer
    last_seen: float  # when it last answered or wrote to us
    fails: int = 0  # RPCs missed in a row

    @property
    def node_id(self) -> str:
        return self.record.node_id

    @property
    def addr(self) -> str:
        return self.record.addrs[0]


@dataclass(slots=True)
class Bucket:
    contacts: list[Contact] = field(default_factory=list)  # least recently seen first
    replacements: list[Contact] = field(default_factory=list)  # newest last
    touched: float = 0.0  # last lookup into its range, or last word from a contact in it


class RoutingTable:
    def __init__(self, own: int, *, k: int = 20, max_fails: int = 2, now: float = 0.0) -> None:
        self.own = own
        self.k = k
        self.max_fails = max_fails
        # a new node's join lookup fills its near buckets; the rest wait a refresh interval
        self.buckets = [Bucket(touched=now) for _ in range(ID_BITS)]
        self._index: dict[str, Contact] = {}  # node id -> contact, for every bucket entry

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._index

    def get(self, node_id: str) -> Contact | None:
        return self._index.get(node_id)

    def contacts(self) -> list[Contact]:
        return [c for b in self.buckets for c in b.contacts]

    def update(self, record: PeerRecord, now: float) -> Contact | None:
        """`record`'s node answered or wrote to us (authenticated by the carrier).

        Returns the least recently seen contact of its bucket when the bucket is full: the
        caller pings it and reports the outcome (`responded` / `failed`)."""
        key = record.key
        if key == self.own:
            return None
        bucket = self.buckets[bucket_index(self.own, key)]
        bucket.touched = now
        held = self._index.get(record.node_id)
        if held is not None:
            if record.seq >= held.record.seq:
                held.record = record
            held.last_seen, held.fails = now, 0
            bucket.contacts.remove(held)
            bucket.contacts.append(held)
            return None
        contact = Contact(record=record, key=key, last_seen=now)
        if len(bucket.contacts) < self.k:
            bucket.contacts.append(contact)
            self._index[record.node_id] = contact
            return None
        bucket.replacements = [c for c in bucket.replacements
                               if c.node_id != record.node_id][-(self.k - 1):]
        bucket.replacements.append(contact)
        return bucket.contacts[0]

    def responded(self, node_id: str, now: float) -> None:
        c = self._index.get(node_id)
        if c is not None:
            self.update(c.record, now)

    def failed(self, node_id: str) -> Contact | None:
        """An RPC to `node_id` timed out. Returns the contact if this evicted it."""
        c = self._index.get(node_id)
        if c is None:
            return None
        c.fails += 1
        bucket = self.buckets[bucket_index(self.own, c.key)]
        if c.fails < self.max_fails and not bucket.replacements:
            return None
        self.remove(node_id)
        return c

    def remove(self, node_id: str) -> None:
        c = self._index.pop(node_id, None)
        if c is None:
            return
        bucket = self.buckets[bucket_index(self.own, c.key)]
        bucket.contacts.remove(c)
        if bucket.replacements:
            new = bucket.replacements.pop()
            bucket.contacts.append(new)
            self._index[new.node_id] = new

    def closest(self, target: int, n: int, exclude: Iterable[str] = ()) -> list[Contact]:
        """The n contacts nearest to `target` by XOR distance."""
        skip = set(exclude)
        found = [c for nid, c in self._index.items() if nid not in skip]
        found.sort(key=lambda c: c.key ^ target)
        return found[:n]

    def touch(self, target: int, now: float) -> None:
        if target != self.own:
            self.buckets[bucket_index(self.own, target)].touched = now

    def stale_buckets(self, now: float, interval: float) -> list[int]:
        """Buckets due a refresh: nobody looked into them and no contact in them was heard
        from for `interval` (as BitTorrent's BEP 5 has it: traffic keeps a bucket fresh, a
        refresh lookup is for the quiet ones), from the nearest bucket
        that holds anyone out to the farthest (buckets nearer than that are empty in any
        network much smaller than 2^256, and a lookup of our own id covers them)."""
        filled = [i for i, b in enumerate(self.buckets) if b.contacts]
        if not filled:
            return []
        return [i for i in range(filled[0], ID_BITS)
                if now - self.buckets[i].touched >= interval]
