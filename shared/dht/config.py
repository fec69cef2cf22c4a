"""DhtNode's settings, and its record of a request in flight."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class DhtConfig:
    """Defaults as bench.dht measured them (docs/dht.md)."""

    k: int = 20  # bucket size and lookup width
    alpha: int = 3  # FindNode queries in flight per lookup
    rpc_timeout_s: float = 1.0  # wait this long for an answer before a retry
    rpc_retries: int = 1  # retransmissions (to the next address) before an RPC fails
    max_fails: int = 2  # failed RPCs in a row that evict a contact with no replacement waiting
    maintenance_s: float = 30.0  # mean interval of the maintenance pass
    refresh_s: float = 600.0  # refresh a bucket quiet this long (no lookup in, no word out)
    refreshes_per_pass: int = 3  # at most this many bucket refreshes per pass
    random_lookup_s: float = 300.0  # one random-id lookup this often
    probe_s: float = 60.0  # ping dormant contacts this often
    probe_count: int = 2  # how many per probe
    dormant_max: int = 128  # evicted contacts remembered for probing
    bootstrap_s: float = 300.0  # ping the bootstrap addresses this often
    record_ttl_s: int = 3600  # lifetime of the node's own record (renewed at half)
    max_records: int = 4096  # verified records held
    max_have: int = 40  # records listed in FindNode.have


@dataclass(slots=True)
class Rpc:
    """A request in flight (DhtNode's bookkeeping)."""

    rpc: str
    kind: str  # "ping" or "find"
    purpose: str  # "lookup", "evict", "probe", "bootstrap"
    addrs: tuple[str, ...]  # addresses to try in turn
    node_id: str | None  # expected answerer (None: bootstrap by address)
    lookup_id: int | None
    data: bytes
    deadline: float
    tries: int = 1
