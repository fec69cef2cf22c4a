"""shared.dht: the XOR metric, k-buckets, signed records, the wire, and whole networks on
shared.dht.memnet's simulated clock (convergence, churn, a server that leaves, a partition
that heals)."""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from collections.abc import Callable

import pytest

from shared.dht import DhtConfig, DhtNode, LookupResult, RoutingTable, bucket_index, distance
from shared.dht.errors import ExpiredRecord, ForgedRecord, MalformedRecord, StaleRecord
from shared.dht.memnet import EPOCH, MemNet, NetModel
from shared.dht.record import MAX_TTL_S, PeerRecord, RecordStore, sign_record
from shared.dht.routing import id_hex, random_id_in_bucket
from shared.dht.wire import FindNode, Nodes, Ping, Pong, decode
from shared.envelope import Identity
from shared.errors import MessageError

NOW = EPOCH


@functools.cache
def ids(n: int = 120) -> list[Identity]:
    return [Identity.generate() for _ in range(n)]


def fake_record(key: int, seq: int = 1) -> PeerRecord:
    """A well-formed record for routing-table tests (never verified there)."""
    return PeerRecord(node_id=id_hex(key), public_key="ab" * 1952, addrs=(f"mem:{key}",),
                      seq=seq, expires=int(NOW) + 3600, signature="cd" * 3309)


# -- the metric and the table ------------------------------------------------------------------

def test_xor_metric_and_bucket_index() -> None:
    rng = random.Random(1)
    for _ in range(200):
        a, b, c = (rng.getrandbits(256) for _ in range(3))
        assert distance(a, a) == 0
        assert distance(a, b) == distance(b, a)
        assert distance(a, c) <= distance(a, b) + distance(b, c)
        # unidirectional: for a and a distance d there is exactly one b
        assert distance(a, a ^ distance(a, b)) == distance(a, b)
    assert bucket_index(0, 1) == 0
    assert bucket_index(0, 2) == bucket_index(0, 3) == 1
    assert bucket_index(0b1000, 0b0111) == 3
    assert bucket_index(0, 1 << 255) == 255
    assert bucket_index(5, 5) == -1
    for i in (0, 1, 7, 100, 255):
        own = rng.getrandbits(256)
        assert bucket_index(own, random_id_in_bucket(own, i, rng)) == i


def test_bucket_is_lru_with_ping_before_evict() -> None:
    t = RoutingTable(0, k=2, max_fails=2)
    a, b, c = (fake_record(k) for k in (0b100, 0b101, 0b110))  # all in bucket 2
    assert t.update(a, NOW) is None
    assert t.update(b, NOW + 1) is None
    oldest = t.update(c, NOW + 2)  # full: c waits, a (least recently seen) must be pinged
    assert oldest is not None
    assert oldest.node_id == a.node_id
    assert c.node_id not in t
    assert [x.node_id for x in t.buckets[2].replacements] == [c.node_id]
    t.responded(a.node_id, NOW + 3)  # a answered: it stays, and moves to the tail
    assert [x.node_id for x in t.buckets[2].contacts] == [b.node_id, a.node_id]
    assert c.node_id not in t
    oldest = t.update(c, NOW + 4)
    assert oldest is not None
    assert oldest.node_id == b.node_id
    gone = t.failed(b.node_id)  # silent, with a replacement waiting: evicted at once
    assert gone is not None
    assert gone.node_id == b.node_id
    assert b.node_id not in t
    assert c.node_id in t
    assert not t.buckets[2].replacements
    # with no replacement waiting, a contact survives max_fails - 1 misses
    assert t.failed(a.node_id) is None
    assert a.node_id in t
    t.responded(a.node_id, NOW + 5)  # an answer resets the count
    assert t.failed(a.node_id) is None
    assert t.failed(a.node_id) is not None
    assert a.node_id not in t
    assert len(t) == 1


def test_closest_orders_by_xor_distance_and_buckets_cap_at_k() -> None:
    rng = random.Random(2)
    own = rng.getrandbits(256)
    t = RoutingTable(own, k=20)
    recs = [fake_record(rng.getrandbits(256)) for _ in range(300)]
    for r in recs:
        t.update(r, NOW)
    assert all(len(b.contacts) <= 20 for b in t.buckets)
    assert len(t.buckets[255].contacts) == 20
    assert len(t.buckets[255].replacements) == 20
    target = rng.getrandbits(256)
    got = [c.key for c in t.closest(target, 10)]
    held = sorted((c.key for c in t.contacts()), key=lambda k: k ^ target)
    assert got == held[:10]
    # every contact of the nearest buckets is held: nothing nearer than them is missing
    near = [r.key for r in recs if bucket_index(own, r.key) < 250]
    assert all(id_hex(k) in t for k in near)


# -- records ----------------------------------------------------------------------------------

def test_records_verified_once_per_version_and_refused_when_bad() -> None:
    a, b = ids()[0], ids()[1]
    store = RecordStore()
    rec = sign_record(a, addrs=("mem:a",), seq=10, expires=int(NOW) + 600)
    assert store.accept(rec, NOW) == rec
    assert store.verifications == 1
    copy = PeerRecord.from_dict(rec.to_dict())
    assert store.accept(copy, NOW + 1) == rec
    assert store.verifications == 1
    # forged: addresses changed under the owner's signature
    forged = dataclasses.replace(rec, addrs=("mem:evil",), seq=11)
    with pytest.raises(ForgedRecord):
        store.accept(forged, NOW)
    with pytest.raises(ForgedRecord):  # the same forgery again costs no verification
        store.accept(forged, NOW)
    assert store.verifications == 2
    # forged: b signs a record claiming a's node id
    mine = sign_record(b, addrs=("mem:b",), seq=12, expires=int(NOW) + 600)
    with pytest.raises(ForgedRecord) as err:
        store.accept(dataclasses.replace(mine, node_id=a.node_id), NOW)
    assert err.value.code == "forged_record"
    assert err.value.field == "node_id"
    # expired, and too far ahead
    with pytest.raises(ExpiredRecord):
        store.accept(rec, rec.expires)
    far = sign_record(a, addrs=("mem:a",), seq=13, expires=int(NOW) + MAX_TTL_S + 3600)
    with pytest.raises(ExpiredRecord):
        store.accept(far, NOW)
    # stale: an older seq once a newer one is held; a different record under the same seq
    newer = sign_record(a, addrs=("mem:a2",), seq=20, expires=int(NOW) + 600)
    assert store.accept(newer, NOW) == newer
    with pytest.raises(StaleRecord) as stale:
        store.accept(rec, NOW)
    assert stale.value.code == "stale_record"
    twin = sign_record(a, addrs=("mem:a3",), seq=20, expires=int(NOW) + 600)
    with pytest.raises(StaleRecord):
        store.accept(twin, NOW)
    assert store.get(a.node_id) == newer
    assert store.drop_expired(NOW + 601) == [a.node_id]
    assert a.node_id not in store


def test_wire_round_trip_and_typed_refusals() -> None:
    a = ids()[0]
    rec = sign_record(a, addrs=("mem:a", "ws:relay"), seq=3, expires=int(NOW) + 600)
    msgs = [Ping(rpc="0" * 16, sender=a.node_id, seq=3, record=rec, want_record=True),
            Pong(rpc="1" * 16, sender=a.node_id, seq=3),
            FindNode(rpc="2" * 16, sender=a.node_id, seq=3, target="f" * 64,
                     have=(("e" * 64, 9),)),
            Nodes(rpc="3" * 16, sender=a.node_id, seq=3, records=(rec,),
                  refs=(("d" * 64, 7),))]
    for m in msgs:
        assert decode(m.encode()) == m
    bad = [b"not json", b"[]", b'{"v":2}', b'{"v":1,"type":"gossip"}',
           Ping(rpc="0" * 16, sender=a.node_id, seq=3).encode().replace(b'"seq":3',
                                                                         b'"seq":-3'),
           Ping(rpc="0" * 16, sender=a.node_id, seq=3).encode().replace(b'"v":1',
                                                                         b'"v":1,"x":1')]
    for data in bad:
        with pytest.raises(MessageError):
            decode(data)
    tampered = msgs[0].encode().replace(rec.public_key[:8].encode(), b"ABCDEF12", 1)
    with pytest.raises(MalformedRecord) as err:
        decode(tampered)
    assert err.value.field == "public_key"
    with pytest.raises(MessageError) as other:  # a record that is not the sender's own
        Ping(rpc="0" * 16, sender="0" * 64, seq=3, record=rec)
    assert other.value.field == "record"


def test_answers_send_refs_only_for_records_the_asker_holds_at_that_version() -> None:
    a, b, x = ids()[0], ids()[1], ids()[2]
    nb = DhtNode(b, ["mem:b"], now=NOW, seed=1)
    x_old = sign_record(x, addrs=("mem:x",), seq=1, expires=int(NOW) + 600)
    x_new = sign_record(x, addrs=("mem:x2",), seq=2, expires=int(NOW) + 600)
    nb.table.update(nb.records.accept(x_new, NOW), NOW)
    for have, full in (((x.node_id, 1),), True), (((x.node_id, 2),), False), ((), True):
        ask = FindNode(rpc="5" * 16, sender=a.node_id, seq=1, target=x.node_id, have=have)
        nb.receive("mem:a", ask.encode(), NOW)
        (addr, data), = nb.drain()
        answer = decode(data)
        assert addr == "mem:a"
        assert isinstance(answer, Nodes)
        assert (answer.records == (x_new,)) is full
        assert (answer.refs == ((x.node_id, 2),)) is not full
    # the asker side: a candidate that failed at its old address gets another chance when a
    # newer record arrives
    from shared.dht.lookup import FAILED, FRESH, Lookup
    lk = Lookup(1, x_old.key, "user", NOW, True)
    lk.add(x_old, 1)
    lk.cands[x.node_id].state = FAILED
    lk.add(x_new, 2)
    assert lk.cands[x.node_id].state == FRESH
    assert lk.cands[x.node_id].record == x_new


# -- networks on the simulated clock ------------------------------------------------------------

FAST = DhtConfig(maintenance_s=10.0, refresh_s=120.0, random_lookup_s=60.0, probe_s=10.0,
                 bootstrap_s=60.0)
# no bootstrap pings after the join: only what the nodes remember can re-merge them
ALONE = dataclasses.replace(FAST, bootstrap_s=1e9)


class Net:
    """n nodes joined through `server` (a node like the others), then settled."""

    def __init__(self, n: int, *, cfg: DhtConfig = FAST, loss: float = 0.0, seed: int = 0,
                 first: int = 0) -> None:
        self.net = MemNet(NetModel(loss=loss), seed=seed)
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.results: dict[tuple[str, int], LookupResult] = {}
        self.net.on_result = lambda addr, r: self.results.__setitem__((addr, r.lookup_id), r)
        self.next = first
        self.add("server", boot=())
        for _ in range(n - 1):
            self.net.run_for(0.5)
            self.add()
        self.net.run_for(60)

    def add(self, addr: str | None = None, boot: tuple[str, ...] | None = None) -> str:
        identity = ids()[self.next]
        self.next += 1
        addr = addr or f"mem:{self.next}"
        if boot is None:
            others = sorted(a for a in self.net.nodes if a != "server")
            boot = ("server", *self.rng.sample(others, min(2, len(others))))
        self.net.add(addr, DhtNode(identity, [addr], now=self.net.now, config=self.cfg,
                                   bootstrap=boot, seed=self.net.node_seed()))
        return addr

    def lookup(self, src: str, target: str, *, stop_on_found: bool = True) -> LookupResult:
        node = self.net.nodes[src]
        lid = node.lookup(target, self.net.now, stop_on_found=stop_on_found)
        self.net.flush(src)
        self.net.run_for(10)
        return self.results[(src, lid)]

    def find_all(self, pairs: list[tuple[str, str]]) -> list[LookupResult]:
        """Node lookups, all started at once (as a busy network would run them)."""
        started = []
        for s, t in pairs:
            started.append((s, self.net.nodes[s].lookup(self.net.nodes[t].node_id,
                                                         self.net.now)))
            self.net.flush(s)
        self.net.run_for(30)
        return [self.results[key] for key in started]

    def pairs(self, count: int, srcs: list[str] | None = None,
              dsts: list[str] | None = None) -> list[tuple[str, str]]:
        srcs = srcs or sorted(self.net.nodes)
        dsts = dsts or sorted(self.net.nodes)
        out: list[tuple[str, str]] = []
        while len(out) < count:
            s, t = self.rng.choice(srcs), self.rng.choice(dsts)
            if s != t:
                out.append((s, t))
        return out


def test_lookups_converge_to_the_true_nearest_nodes() -> None:
    w = Net(30)
    found = w.find_all(w.pairs(40))
    assert all(r.found for r in found)
    assert max(r.hops or 0 for r in found) <= 4
    keys = {n.node_id: n.key for n in w.net.nodes.values()}
    for src in sorted(w.net.nodes)[:5]:  # a full lookup of a random key finds the k nearest
        target = w.rng.getrandbits(256)
        r = w.lookup(src, id_hex(target), stop_on_found=False)
        me = w.net.nodes[src].node_id
        truth = sorted((k for nid, k in keys.items() if nid != me),
                       key=lambda k: k ^ target)[:20]
        assert [x.key for x in r.closest] == truth


def test_churn_nodes_leave_without_notice_and_new_ones_are_found() -> None:
    w = Net(30, loss=0.01, seed=3)
    gone = w.rng.sample(sorted(a for a in w.net.nodes if a != "server"), 10)
    for addr in gone:  # 35% leave without a word, as many join
        w.net.remove(addr)
        w.net.run_for(2)
        w.add()
    w.net.run_for(60)
    found = w.find_all(w.pairs(60))
    assert sum(r.found for r in found) >= 59
    dead = {ids()[i].node_id for i in range(len(ids()))} - {
        n.node_id for n in w.net.nodes.values()}
    w.net.run_for(120)  # lookups and refreshes meet the dead contacts and evict them
    held = sum(len(n.table) for n in w.net.nodes.values())
    stale = sum(c.node_id in dead for n in w.net.nodes.values() for c in n.table.contacts())
    assert stale <= 0.05 * held, (stale, held)


def test_server_down_nodes_keep_finding_each_other_and_joins_use_other_nodes() -> None:
    w = Net(30, seed=4)
    w.net.remove("server")
    fresh = [w.add() for _ in range(3)]  # bootstrap: the (gone) server and two live nodes
    w.net.run_for(40)
    live = sorted(w.net.nodes)
    found = w.find_all(w.pairs(30, dsts=live) + [(s, f) for f in fresh for s in live[:3]])
    assert all(r.found for r in found)
    # the server comes back empty-handed; the nodes' periodic bootstrap pings refill it
    w.net.add("server", DhtNode(ids()[0], ["server"], now=w.net.now, config=w.cfg,
                                seed=w.net.node_seed()))
    w.net.run_for(2 * w.cfg.bootstrap_s)
    assert len(w.net.nodes["server"].table) >= 20
    assert w.lookup(live[0], ids()[0].node_id).found


def split_and_heal(cfg: DhtConfig, *, forget_across: bool = False
                   ) -> tuple[Net, dict[str, int], int, int]:
    """30 nodes split in two for 300 s, then healed for 240 s: (net, side of each address,
    nodes holding a contact across during the split, the same after healing). With
    `forget_across`, whatever contacts across survived the split (a contact is dropped only
    when a request to it fails, so one never asked survives; which one depends on the random
    identities) are dropped from the tables and replacement caches before the heal."""
    w = Net(30, cfg=cfg, seed=5)
    w.net.remove("server")  # no bootstrap node to fall back on: the halves must re-merge alone
    addrs = sorted(w.net.nodes)
    side = {a: i % 2 for i, a in enumerate(addrs)}
    w.net.partition(side)
    w.net.run_for(300)

    def crossing() -> int:
        # (a contact of the removed server, never asked since, is in neither half)
        return sum(any(side.get(c.addr, side[a]) != side[a] for c in n.table.contacts())
                   for a, n in w.net.nodes.items())

    if forget_across:  # the server's surviving contacts go too: it is gone, not across
        for a, n in w.net.nodes.items():
            for bucket in n.table.buckets:
                bucket.replacements[:] = [c for c in bucket.replacements
                                          if side.get(c.addr) == side[a]]
            for c in n.table.contacts():
                if side.get(c.addr) != side[a]:
                    n.table.remove(c.node_id)
    during = crossing()
    w.net.heal()
    w.net.run_for(240)
    return w, side, during, crossing()


def test_partition_heals_without_any_bootstrap_node() -> None:
    w, side, during, after = split_and_heal(ALONE, forget_across=True)
    assert during == 0
    assert after == len(w.net.nodes)
    a = [x for x in side if side[x] == 0]
    b = [x for x in side if side[x] == 1]
    found = w.find_all(w.pairs(20, a, b) + w.pairs(20, b, a))
    assert all(r.found for r in found)


def test_without_dormant_probes_a_healed_partition_stays_split() -> None:
    """The mechanism that re-merges is the probing of evicted contacts: without it (and
    without bootstrap pings), nothing ever crosses again. Kademlia's random lookups and
    bucket refreshes alone cannot find what no table holds."""
    _w, _, during, after = split_and_heal(dataclasses.replace(ALONE, probe_count=0),
                                          forget_across=True)
    assert during == 0
    assert after == 0


def test_forged_record_in_an_answer_is_refused_and_never_contacted() -> None:
    w = Net(12, seed=6)
    src = sorted(w.net.nodes)[1]
    node = w.net.nodes[src]
    outsider = ids()[100]  # not in the network; an answer offers a forged record of it
    node.lookup(outsider.node_id, w.net.now, stop_on_found=False)
    addr, data = node.drain()[0]
    ask = decode(data)
    assert isinstance(ask, FindNode)
    answerer = w.net.nodes[addr]
    real = sign_record(outsider, addrs=("mem:outsider",), seq=5, expires=int(w.net.now) + 600)
    forged = dataclasses.replace(real, addrs=("mem:victim",))  # at distance 0: asked first
    reply = Nodes(rpc=ask.rpc, sender=answerer.node_id, seq=answerer.record.seq,
                  records=(forged,))
    node.receive(addr, reply.encode(), w.net.now)
    out = node.drain()
    assert node.stats["refused_forged_record"] == 1
    assert out, "the lookup went on with the other candidates"
    assert not any(a == "mem:victim" for a, _ in out)
    # the genuine record of the same node is still welcome (the forgery did not poison it)
    assert node.records.accept(real, w.net.now) == real
    # a message claiming a sender from an address its record does not list is not believed
    other = next(n for a, n in w.net.nodes.items() if a not in (src, addr))
    liar = Ping(rpc="9" * 16, sender=other.node_id, seq=other.record.seq,
                record=other.record)
    before = node.table.get(other.node_id)
    seen = before.last_seen if before else None
    node.receive("mem:elsewhere", liar.encode(), w.net.now + 1)
    after = node.table.get(other.node_id)
    assert (after.last_seen if after else None) == seen


def test_records_are_renewed_and_a_moved_node_is_found_at_its_new_address() -> None:
    cfg = dataclasses.replace(FAST, record_ttl_s=120)  # renewed every 60 s
    w = Net(16, cfg=cfg, seed=7)
    first = {a: n.record.seq for a, n in w.net.nodes.items()}
    w.net.run_for(200)  # > a lifetime: without renewal every record would have expired
    assert all(n.record.seq > first[a] for a, n in w.net.nodes.items())
    assert all(len(n.table) >= 12 for n in w.net.nodes.values())
    assert all(r.found for r in w.find_all(w.pairs(20)))
    # a node moves: a new record (higher seq) with the new address; the old one is stale
    old_addr = sorted(a for a in w.net.nodes if a != "server")[3]
    mover = w.net.remove(old_addr)
    assert mover is not None
    old_record = mover.record
    mover.set_addrs(["mem:moved"], w.net.now)
    w.net.add("mem:moved", mover, start=False)
    mover.lookup(mover.node_id, w.net.now, purpose="refresh")  # says hello to its neighbours
    w.net.flush("mem:moved")
    w.net.run_for(5)
    told = [n for n in w.net.nodes.values() if n is not mover
            and (r := n.records.get(mover.node_id)) is not None and r.seq == mover.record.seq]
    assert told, "nobody heard the new record"
    with pytest.raises(StaleRecord):  # still unexpired, but superseded
        told[0].records.accept(old_record, w.net.now)
    w.net.run_for(55)
    srcs = [a for a in sorted(w.net.nodes) if a != "mem:moved"]
    found = w.find_all([(s, "mem:moved") for s in srcs])
    assert all(r.found for r in found)
    assert all(next(x for x in r.closest if x.node_id == mover.node_id).addrs == ("mem:moved",)
               for r in found)


async def test_asyncio_driver_on_a_real_clock() -> None:
    """shared.dht.aio: the driver a carrier plugs into, here over in-process queues with a
    5 ms delay, on the event loop's real clock."""
    import asyncio

    from shared.dht.aio import DhtService

    loop = asyncio.get_running_loop()
    services: dict[str, DhtService] = {}

    def carrier(me: str) -> Callable[[str, bytes], None]:
        def send(addr: str, data: bytes) -> None:
            if addr in services:
                loop.call_later(0.005, services[addr].deliver, me, data)
        return send

    addrs = [f"q:{i}" for i in range(8)]
    for i, addr in enumerate(addrs):
        node = DhtNode(ids()[i], [addr], now=time.time(), bootstrap=() if i == 0 else (addrs[0],),
                       seed=i)
        services[addr] = DhtService(node, carrier(addr))
    tasks = [asyncio.create_task(s.run()) for s in services.values()]
    try:
        for s in services.values():
            s.start()
        await asyncio.sleep(0.5)
        results = await asyncio.wait_for(asyncio.gather(*(
            services[addrs[i]].find(ids()[(i + 3) % 8].node_id) for i in range(8))), 10)
        assert all(r.found for r in results)
        assert all(r.hops is not None and r.hops <= 3 for r in results)
    finally:
        for s in services.values():
            s.close()
        await asyncio.gather(*tasks)
