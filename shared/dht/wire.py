"""DHT messages: frozen, keyword-only dataclasses; the wire form is one canonical JSON object.

    {"v": 1, "type": "find_node", "rpc": ..., "sender": ..., "seq": ..., "record": null,
     "want_record": false, "target": ..., "have": [...]}

Every message carries the sender's node id and the seq of its current record; the record
itself rides along only when the receiver may lack that version (`record`), or when asked
(`want_record`). The carrier (a data channel to a known peer, the server's relay that checked
the node's signed Hello, or the in-memory network) says which address a message came from;
the receiver believes `sender` only if the sender's verified record lists that address.

    ping -> pong                 liveness (ping-before-evict, bootstrap by address)
    find_node(target, have) -> nodes(records, refs)
                                 the k contacts nearest `target` the answerer knows: as full
                                 signed records, except those the asker listed in `have`
                                 ({node_id, seq} of records it holds) at a seq no older than
                                 the answerer's: those go as refs {node_id, seq}.

Messages are written as canonical JSON (shared.frame.canonical_json) but read as any JSON:
nothing signs a message as a whole (the records inside carry their own signatures, over
their own canonical bytes). Decoding checks sizes, types and ranges and raises a typed
error naming the field (MessageError, or MalformedRecord for a record's fields).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from shared.dht.record import MAX_SEQ, PeerRecord
from shared.errors import MessageError
from shared.frame import canonical_json

VERSION = 1
MAX_MESSAGE = 256 * 1024  # a data channel's largest message
MAX_RECORDS = 32  # records + refs in one `nodes`
MAX_HAVE = 64
RPC_RE = re.compile(r"[0-9a-f]{16}")
HEX64 = re.compile(r"[0-9a-f]{64}")
HEX = re.compile(r"[0-9a-f]+")
COMMON = ("v", "type", "rpc", "sender", "seq", "record", "want_record")


def _need(ok: bool, cls: str, name: str, what: str) -> None:
    if not ok:
        raise MessageError(f"{cls}.{name}: {what}", field=name)


def _hex64(cls: str, name: str, value: Any) -> None:
    _need(isinstance(value, str) and bool(HEX64.fullmatch(value)), cls, name,
          "must be 64 lowercase hex digits")


def _pairs(cls: str, name: str, pairs: tuple[tuple[str, int], ...]) -> None:
    _need(all(isinstance(n, str) and len(n) == 64 and isinstance(q, int)
              and not isinstance(q, bool) and 0 <= q <= MAX_SEQ for n, q in pairs)
          and bool(HEX.fullmatch("".join(n for n, _ in pairs) or "0")), cls, name,
          "each entry is a 64 hex digit node id and a seq in [0, 2^53-1]")


def _decode_pairs(cls: str, name: str, raw: Any) -> tuple[tuple[str, int], ...]:
    _need(isinstance(raw, list), cls, name, "must be a list")
    out = []
    for item in raw:
        _need(isinstance(item, dict) and set(item) == {"node_id", "seq"}, cls, name,
              "each entry is {node_id, seq}")
        out.append((item["node_id"], item["seq"]))
    return tuple(out)


@dataclass(frozen=True, kw_only=True, slots=True)
class DhtMessage:
    TYPE: ClassVar[str]
    EXTRA: ClassVar[tuple[str, ...]] = ()
    rpc: str  # request id, 16 lowercase hex digits; the answer echoes it
    sender: str  # the sender's node id (64 hex)
    seq: int  # seq of the sender's current record
    record: PeerRecord | None = None  # the sender's own record, when the receiver may lack it
    want_record: bool = False  # the sender lacks the receiver's current record: send it

    def __post_init__(self) -> None:
        name = type(self).__name__
        _need(isinstance(self.rpc, str) and bool(RPC_RE.fullmatch(self.rpc)), name, "rpc",
              "must be 16 lowercase hex digits")
        _hex64(name, "sender", self.sender)
        _need(isinstance(self.seq, int) and not isinstance(self.seq, bool)
              and 0 <= self.seq <= MAX_SEQ, name, "seq", "must be an integer in [0, 2^53-1]")
        _need(isinstance(self.want_record, bool), name, "want_record", "must be a boolean")
        if self.record is not None:
            _need(self.record.node_id == self.sender and self.record.seq == self.seq, name,
                  "record", "must be the sender's own record at `seq`")

    def body(self) -> dict[str, Any]:
        return {}

    def encode(self) -> bytes:
        """Canonical JSON. Records go in as their cached canonical text (a record is sent
        many times; re-encoding its 10 KB of hex each time was a third of the CPU)."""
        recs: list[PeerRecord] = []

        def slot(rec: PeerRecord) -> str:
            recs.append(rec)
            return f"\x00{len(recs) - 1}\x00"

        body = self.body()
        if isinstance(body.get("records"), list):
            body["records"] = [slot(r) for r in body["records"]]
        obj = {"v": VERSION, "type": self.TYPE, "rpc": self.rpc, "sender": self.sender,
               "seq": self.seq, "want_record": self.want_record,
               "record": None if self.record is None else slot(self.record), **body}
        text = canonical_json(obj).decode("utf-8")
        for i, rec in enumerate(recs):
            text = text.replace(f'"\\u0000{i}\\u0000"', rec.json(), 1)
        return text.encode("utf-8")


@dataclass(frozen=True, kw_only=True, slots=True)
class Ping(DhtMessage):
    """Are you there? (and: here is who I am)."""

    TYPE: ClassVar[str] = "ping"


@dataclass(frozen=True, kw_only=True, slots=True)
class Pong(DhtMessage):
    """Answer to a Ping."""

    TYPE: ClassVar[str] = "pong"


@dataclass(frozen=True, kw_only=True, slots=True)
class FindNode(DhtMessage):
    """Which nodes do you know nearest to `target`?"""

    TYPE: ClassVar[str] = "find_node"
    EXTRA: ClassVar[tuple[str, ...]] = ("target", "have")
    target: str  # the id looked up, 64 hex
    # (node id, seq) of records the asker holds: answered with a ref unless newer
    have: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        DhtMessage.__post_init__(self)
        _hex64("FindNode", "target", self.target)
        _need(isinstance(self.have, tuple) and len(self.have) <= MAX_HAVE, "FindNode", "have",
              f"must be a list of at most {MAX_HAVE} (node id, seq)")
        _pairs("FindNode", "have", self.have)

    def body(self) -> dict[str, Any]:
        return {"target": self.target,
                "have": [{"node_id": n, "seq": q} for n, q in self.have]}


@dataclass(frozen=True, kw_only=True, slots=True)
class Nodes(DhtMessage):
    """Answer to FindNode: the nearest contacts the answerer knows, nearest first."""

    TYPE: ClassVar[str] = "nodes"
    EXTRA: ClassVar[tuple[str, ...]] = ("records", "refs")
    records: tuple[PeerRecord, ...] = ()  # full signed records
    refs: tuple[tuple[str, int], ...] = ()  # (node id, seq) of records the asker has

    def __post_init__(self) -> None:
        DhtMessage.__post_init__(self)
        _need(len(self.records) + len(self.refs) <= MAX_RECORDS, "Nodes", "records",
              f"at most {MAX_RECORDS} records and refs together")
        _pairs("Nodes", "refs", self.refs)

    def body(self) -> dict[str, Any]:
        return {"records": list(self.records),
                "refs": [{"node_id": n, "seq": s} for n, s in self.refs]}


TYPES: dict[str, type[DhtMessage]] = {c.TYPE: c for c in (Ping, Pong, FindNode, Nodes)}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(data: bytes) -> DhtMessage:
    """Parse one DHT message; raises FrameError / MessageError / MalformedRecord."""
    if len(data) > MAX_MESSAGE:
        raise MessageError(f"DHT message of {len(data)} bytes > {MAX_MESSAGE}", field="length")
    try:  # not signed as a whole, so any JSON spelling of the object will do
        obj = json.loads(bytes(data).decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError(f"DHT message is not UTF-8 JSON: {exc}", field="json") from None
    _need(isinstance(obj, dict), "DhtMessage", "json", "must be a JSON object")
    _need(obj.get("v") == VERSION, "DhtMessage", "v", f"unsupported DHT version (this node "
          f"speaks {VERSION})")
    kind = obj.get("type")
    cls = TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MessageError(f"unknown DHT message type {str(kind)[:40]!r}", field="type")
    name = cls.__name__
    unknown = sorted(set(obj) - set(COMMON) - set(cls.EXTRA))
    _need(not unknown, name, unknown[0] if unknown else "", "unknown field")
    for f in COMMON[2:] + cls.EXTRA:
        _need(f in obj, name, f, "missing")
    raw = obj["record"]
    kwargs: dict[str, Any] = {
        "rpc": obj["rpc"], "sender": obj["sender"], "seq": obj["seq"],
        "want_record": obj["want_record"],
        "record": None if raw is None else PeerRecord.from_dict(raw)}
    if cls is FindNode:
        kwargs.update(target=obj["target"], have=_decode_pairs(name, "have", obj["have"]))
    elif cls is Nodes:
        recs, refs = obj["records"], obj["refs"]
        _need(isinstance(recs, list) and isinstance(refs, list)
              and len(recs) + len(refs) <= MAX_RECORDS, name, "records",
              f"records and refs must be lists of at most {MAX_RECORDS} together")
        kwargs.update(records=tuple(PeerRecord.from_dict(r) for r in recs),
                      refs=_decode_pairs(name, "refs", refs))
    return cls(**kwargs)
