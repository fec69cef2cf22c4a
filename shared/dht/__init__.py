"""Kademlia peer discovery (docs/dht.md): pure Python, sans I/O, so tabs run it too.

    record.py   signed peer records (ML-DSA-65) and the verify-once RecordStore
    routing.py  XOR metric, k-buckets with ping-before-evict
    wire.py     the four messages (ping, pong, find_node, nodes) as canonical JSON
    lookup.py   one iterative parallel lookup
    config.py   DhtConfig (k, alpha, timeouts, maintenance intervals)
    node.py     DhtNode: the protocol (bytes in, bytes out, a clock reading each call)
    memnet.py   an in-memory network with modelled latency and loss (tests, bench.dht)
    aio.py      an asyncio driver on a real clock: what a carrier (relay, data channel) wraps
    carrier.py  a participant's carrier (rtc:/relay: routing), for native nodes and tabs
"""

from __future__ import annotations

from shared.dht.config import DhtConfig
from shared.dht.errors import ExpiredRecord, ForgedRecord, RecordError, StaleRecord
from shared.dht.lookup import LookupResult
from shared.dht.node import DhtNode
from shared.dht.record import PeerRecord, RecordStore, sign_record, verify_record
from shared.dht.routing import RoutingTable, bucket_index, distance

__all__ = ["DhtConfig", "DhtNode", "ExpiredRecord", "ForgedRecord", "LookupResult",
           "PeerRecord", "RecordError", "RecordStore", "RoutingTable", "StaleRecord",
           "bucket_index", "distance", "sign_record", "verify_record"]
