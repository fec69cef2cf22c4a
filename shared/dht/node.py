"""A Kademlia node, sans I/O: bytes and clock readings in, bytes to send out.

    node = DhtNode(identity, ["mem:3"], now=t, bootstrap=["server"], seed=3)
    node.start(t)                       # pings the bootstrap addresses
    node.receive(src_addr, data, t)     # a message the carrier delivered from src_addr
    node.tick(t)                        # at node.next_deadline(): timeouts, maintenance
    lid = node.lookup(target_hex, t)    # iterative parallel lookup
    for addr, data in node.drain(): carrier.send(addr, data)
    for result in node.results(): ...   # finished lookups (shared.dht.lookup.LookupResult)

No sockets, no clock, no threads: the native node, a browser tab and the in-memory network
(shared.dht.memnet) drive the same object. Randomness (rpc ids, refresh targets, jitter)
comes from `random.Random(seed)`, so a driver with a seeded clock replays a run exactly.

Maintenance (every ~`maintenance_s`, jittered): bucket refresh (a lookup of a random id in
each bucket nobody looked into for `refresh_s`), a random-id lookup every `random_lookup_s`
(it spreads contacts across the id space), probes of `probe_count` dormant contacts (ones
evicted for silence, kept until their record expires: this is what re-merges the two halves
of a healed partition even when no bootstrap node is reachable), a ping of the bootstrap
addresses every `bootstrap_s` (or at once when the table is empty), renewal of the node's
own record at half its lifetime, and the expiry of records and contacts.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from collections.abc import Sequence

from shared.dht.config import DhtConfig, Rpc
from shared.dht.errors import RecordError, StaleRecord
from shared.dht.lookup import DONE, FAILED, INFLIGHT, Candidate, Lookup, LookupResult
from shared.dht.record import PeerRecord, RecordStore, sign_record
from shared.dht.routing import RoutingTable, id_hex, random_id_in_bucket
from shared.dht.wire import FindNode, Nodes, Ping, Pong, decode
from shared.envelope import Identity
from shared.errors import ProtocolError


class DhtNode:
    def __init__(self, identity: Identity, addrs: Sequence[str], *, now: float,
                 config: DhtConfig | None = None, bootstrap: Sequence[str] = (),
                 seed: int = 0) -> None:
        self.identity = identity
        self.node_id = identity.node_id
        self.key = int(self.node_id, 16)
        self.cfg = config or DhtConfig()
        self.rng = random.Random(seed)
        self.records = RecordStore(self.cfg.max_records)
        self.table = RoutingTable(self.key, k=self.cfg.k, max_fails=self.cfg.max_fails,
                                  now=now)
        self.bootstrap_addrs = tuple(bootstrap)
        self.addrs = tuple(addrs)
        self.record = self._sign(now)
        self.stats: Counter[str] = Counter()  # messages, bytes, timeouts, refusals by code
        self._out: list[tuple[str, bytes]] = []
        self._done: list[LookupResult] = []
        self._rpcs: dict[str, Rpc] = {}
        self._lookups: dict[int, Lookup] = {}
        self._next_lookup_id = 1
        self._told: OrderedDict[str, int] = OrderedDict()  # peer -> our seq it was sent
        self._want: dict[str, bool] = {}  # peers whose current record we lack
        self._dormant: OrderedDict[str, PeerRecord] = OrderedDict()
        self._pinging: dict[str, str] = {}  # node id -> rpc of its evict/probe ping
        self._joined = False
        self._next_maint = now + self._jitter(self.cfg.maintenance_s)
        self._next_random = now + self._jitter(self.cfg.random_lookup_s)
        self._next_probe = now + self._jitter(self.cfg.probe_s)
        self._next_bootstrap = now + self.cfg.bootstrap_s

    # -- the driver's interface ------------------------------------------------------------

    def start(self, now: float) -> None:
        """Join: ping every bootstrap address (their answers start the self-lookup)."""
        for addr in self.bootstrap_addrs:
            self._ping(None, (addr,), "bootstrap", now)

    def add_known(self, records: Sequence[PeerRecord], now: float) -> None:
        """Records remembered from an earlier session: probed, kept if they answer."""
        for rec in records:
            try:
                rec = self.records.accept(rec, now)
            except RecordError as exc:
                self.stats[f"refused_{exc.code}"] += 1
                continue
            if rec.node_id != self.node_id:
                self._ping(rec.node_id, rec.addrs, "probe", now)

    def lookup(self, target: str, now: float, *, purpose: str = "user",
               stop_on_found: bool = True) -> int:
        lid = self._next_lookup_id
        self._next_lookup_id += 1
        key = int(target, 16)
        lk = Lookup(lid, key, purpose, now, stop_on_found and purpose == "user")
        self._lookups[lid] = lk
        self.table.touch(key, now)
        for c in self.table.closest(key, self.cfg.k):
            lk.add(c.record, 1)
        self._step(lk, now)
        return lid

    def drain(self) -> list[tuple[str, bytes]]:
        out, self._out = self._out, []
        return out

    def results(self) -> list[LookupResult]:
        done, self._done = self._done, []
        return done

    def next_deadline(self) -> float:
        return min([self._next_maint, *(r.deadline for r in self._rpcs.values())])

    def set_addrs(self, addrs: Sequence[str], now: float) -> None:
        """New transport hints: a new record (higher seq) goes out with the next messages."""
        self.addrs = tuple(addrs)
        self.record = self._sign(now, self.record.seq)

    # -- receiving --------------------------------------------------------------------------

    def receive(self, src: str, data: bytes, now: float) -> None:
        self.stats["msgs_in"] += 1
        self.stats["bytes_in"] += len(data)
        try:
            msg = decode(data)
        except ProtocolError as exc:
            self.stats[f"refused_{exc.code}"] += 1
            return
        if msg.sender == self.node_id:
            return
        if msg.record is not None:
            self._accept(msg.record, now)
        if msg.want_record:
            self._told.pop(msg.sender, None)
        held = self.records.get(msg.sender)
        authed = held is not None and src in held.addrs
        if held is None or held.seq < msg.seq:
            self._want[msg.sender] = True
        else:
            self._want.pop(msg.sender, None)
        if isinstance(msg, Ping | FindNode):
            if authed and held is not None:
                self._seen(held, now)
            self._answer(src, msg)
            return
        pending = self._rpcs.get(msg.rpc)
        if pending is None or src not in pending.addrs or (
                pending.node_id is not None and pending.node_id != msg.sender):
            self.stats["unexpected_answers"] += 1
            return
        del self._rpcs[msg.rpc]
        if pending.node_id is not None and self._pinging.get(pending.node_id) == msg.rpc:
            del self._pinging[pending.node_id]
        if authed and held is not None:
            self._seen(held, now)
        if isinstance(msg, Nodes) and pending.lookup_id is not None:
            self._on_nodes(msg, pending.lookup_id, now)

    def _answer(self, src: str, msg: Ping | FindNode) -> None:
        want = self._want.get(msg.sender, False)
        record = self._record_for(msg.sender, force=msg.want_record)
        if isinstance(msg, Ping):
            self._send(src, Pong(rpc=msg.rpc, sender=self.node_id, seq=self.record.seq,
                                 record=record, want_record=want))
            return
        have = dict(msg.have)
        near = self.table.closest(int(msg.target, 16), self.cfg.k, exclude=(msg.sender,))
        # a record the asker holds at this seq or newer goes as a ref; a newer one in full
        known = [c.record.seq <= have.get(c.node_id, -1) for c in near]
        self._send(src, Nodes(
            rpc=msg.rpc, sender=self.node_id, seq=self.record.seq, record=record,
            want_record=want,
            records=tuple(c.record for c, k in zip(near, known, strict=True) if not k),
            refs=tuple((c.node_id, c.record.seq)
                       for c, k in zip(near, known, strict=True) if k)))

    def _on_nodes(self, msg: Nodes, lookup_id: int, now: float) -> None:
        lk = self._lookups.get(lookup_id)
        if lk is None:
            return
        answerer = lk.cands.get(msg.sender)
        if answerer is None or answerer.state == DONE:
            return
        if answerer.state == INFLIGHT:
            lk.inflight -= 1
        answerer.state = DONE
        if answerer.dist == 0 and lk.found_depth is None:
            lk.found_depth = answerer.depth
        for rec in msg.records:
            if rec.node_id == self.node_id:
                continue
            try:
                held = self.records.check(rec, now)
            except StaleRecord as exc:  # an old copy: use the newer one held
                self.stats[f"refused_{exc.code}"] += 1
                held = self.records.get(rec.node_id)
            except RecordError as exc:
                self.stats[f"refused_{exc.code}"] += 1
                continue
            if held is not None:
                lk.add(held, answerer.depth + 1)
            else:
                lk.add(rec, answerer.depth + 1, verified=False)
        for nid, seq in msg.refs:  # records we listed in `have`: the lookup's or the store's
            cand = lk.cands.get(nid)
            if cand is not None and cand.record.seq >= seq:
                continue
            held = self.records.get(nid)
            if held is not None and held.seq >= seq and nid != self.node_id:
                lk.add(held, answerer.depth + 1)
        self._step(lk, now)

    # -- timers ---------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        for rpc in [r for r in self._rpcs.values() if r.deadline <= now]:
            if rpc.tries <= self.cfg.rpc_retries:
                rpc.tries += 1
                rpc.deadline = now + self.cfg.rpc_timeout_s
                if rpc.kind == "find":
                    self._count_query(rpc.lookup_id)
                self._emit(rpc.addrs[(rpc.tries - 1) % len(rpc.addrs)], rpc.data)
                continue
            del self._rpcs[rpc.rpc]
            self.stats["rpc_failed"] += 1
            self._failed(rpc, now)
        if now >= self._next_maint:
            self._next_maint = now + self._jitter(self.cfg.maintenance_s)
            self._maintain(now)

    def _failed(self, rpc: Rpc, now: float) -> None:
        nid = rpc.node_id
        if nid is None:
            return
        if self._pinging.get(nid) == rpc.rpc:
            del self._pinging[nid]
        gone = self.table.failed(nid)
        if gone is not None:
            self._dormant[nid] = gone.record
            while len(self._dormant) > self.cfg.dormant_max:
                self._dormant.popitem(last=False)
        lk = self._lookups.get(rpc.lookup_id) if rpc.lookup_id is not None else None
        if lk is not None and (c := lk.cands.get(nid)) is not None and c.state == INFLIGHT:
            c.state = FAILED
            lk.inflight -= 1
            self._step(lk, now)

    def _maintain(self, now: float) -> None:
        cfg = self.cfg
        if now >= self.record.expires - cfg.record_ttl_s / 2:
            self.record = self._sign(now, self.record.seq)
        for nid in self.records.drop_expired(now):
            self.table.remove(nid)
            self._dormant.pop(nid, None)
        for c in self.table.contacts():
            if c.record.expires <= now:
                self.table.remove(c.node_id)
        if (not self.table and self.bootstrap_addrs) or now >= self._next_bootstrap:
            self._next_bootstrap = now + cfg.bootstrap_s
            self.start(now)
        if not self.table:
            return
        for index in self.table.stale_buckets(now, cfg.refresh_s)[:cfg.refreshes_per_pass]:
            self.lookup(id_hex(random_id_in_bucket(self.key, index, self.rng)), now,
                        purpose="refresh")
        if now >= self._next_random:
            self._next_random = now + self._jitter(cfg.random_lookup_s)
            self.lookup(id_hex(self.rng.getrandbits(256)), now, purpose="random")
        if now >= self._next_probe and self._dormant:
            self._next_probe = now + self._jitter(cfg.probe_s)
            ids = list(self._dormant)
            for nid in self.rng.sample(ids, min(cfg.probe_count, len(ids))):
                rec = self._dormant[nid]
                if rec.expires <= now:
                    del self._dormant[nid]
                elif nid not in self._pinging:
                    self._ping(nid, rec.addrs, "probe", now)

    # -- helpers ----------------------------------------------------------------------------

    def _sign(self, now: float, after: int = -1) -> PeerRecord:
        """A new own record: seq = the clock in ms (so a restarted node, which remembers
        nothing, still outranks its old records), above `after`."""
        seq = max(int(now * 1000), after + 1)
        rec = sign_record(self.identity, addrs=self.addrs, seq=seq,
                          expires=int(now) + self.cfg.record_ttl_s)
        self.records.accept(rec, now)
        return rec

    def _jitter(self, mean: float) -> float:
        return mean * (0.5 + self.rng.random())

    def _accept(self, rec: PeerRecord, now: float) -> PeerRecord | None:
        """The newest verified record of rec's node after hearing `rec` (None: refused and
        none held). An older copy (still circulating after its owner renewed) is refused
        and counted, and the newer one held is used."""
        try:
            return self.records.accept(rec, now)
        except StaleRecord as exc:
            self.stats[f"refused_{exc.code}"] += 1
            return self.records.get(rec.node_id)
        except RecordError as exc:
            self.stats[f"refused_{exc.code}"] += 1
            return None

    def _seen(self, rec: PeerRecord, now: float) -> None:
        """`rec`'s owner wrote or answered to us from an address its record lists."""
        self._dormant.pop(rec.node_id, None)
        oldest = self.table.update(rec, now)
        if not self._joined and self.table:
            self._joined = True
            self.lookup(self.node_id, now, purpose="join")
        if oldest is not None and oldest.node_id not in self._pinging:
            self._ping(oldest.node_id, oldest.record.addrs, "evict", now)

    def _record_for(self, node_id: str | None, *, force: bool = False) -> PeerRecord | None:
        """Our record, unless `node_id` was already sent this version."""
        if node_id is not None and not force and self._told.get(node_id) == self.record.seq:
            return None
        if node_id is not None:
            self._told[node_id] = self.record.seq
            self._told.move_to_end(node_id)
            while len(self._told) > self.cfg.max_records:
                self._told.popitem(last=False)
        return self.record

    def _rpc_id(self) -> str:
        return f"{self.rng.getrandbits(64):016x}"

    def _ping(self, node_id: str | None, addrs: tuple[str, ...], purpose: str,
              now: float) -> None:
        msg = Ping(rpc=self._rpc_id(), sender=self.node_id, seq=self.record.seq,
                   record=self._record_for(node_id),
                   want_record=node_id is None or self._want.get(node_id, False))
        if node_id is not None and purpose in ("evict", "probe"):
            self._pinging[node_id] = msg.rpc
        self._request(msg, "ping", purpose, addrs, node_id, None, now)

    def _step(self, lk: Lookup, now: float) -> None:
        k = self.cfg.k
        while picks := lk.to_query(k, self.cfg.alpha):
            if not all([self._verified(c, now) for c in picks]):
                continue  # a forged or stale one failed: pick again
            for cand in picks:
                self._query(lk, cand, now)
            break
        if lk.is_done(k) and not lk.finished:
            lk.finished = True
            del self._lookups[lk.lookup_id]
            for rpc in [r for r in self._rpcs.values() if r.lookup_id == lk.lookup_id]:
                rpc.lookup_id = None  # answers still refresh the table; the lookup is over
            self._done.append(lk.result(k, now))

    def _verified(self, cand: Candidate, now: float) -> bool:
        """Check a candidate's signature before the first query to it (once per version:
        RecordStore keeps what it verified)."""
        if not cand.verified:
            got = self._accept(cand.record, now)
            if got is None or got.seq < cand.record.seq:
                cand.state = FAILED
                return False
            cand.record, cand.verified = got, True
        return True

    def _query(self, lk: Lookup, cand: Candidate, now: float) -> None:
        cand.state = INFLIGHT
        lk.inflight += 1
        nid = cand.record.node_id
        # records the asker holds already (verified or not yet): the answer names them by
        # (id, seq) only
        have = tuple((c.record.node_id, c.record.seq) for c in lk.nearest(self.cfg.max_have))
        msg = FindNode(rpc=self._rpc_id(), sender=self.node_id, seq=self.record.seq,
                       record=self._record_for(nid), want_record=self._want.get(nid, False),
                       target=id_hex(lk.target), have=have)
        lk.queries += 1
        self._request(msg, "find", "lookup", cand.record.addrs, nid, lk.lookup_id, now)

    def _count_query(self, lookup_id: int | None) -> None:
        lk = self._lookups.get(lookup_id) if lookup_id is not None else None
        if lk is not None:
            lk.queries += 1

    def _request(self, msg: Ping | FindNode, kind: str, purpose: str, addrs: tuple[str, ...],
                 node_id: str | None, lookup_id: int | None, now: float) -> None:
        data = msg.encode()
        self._rpcs[msg.rpc] = Rpc(msg.rpc, kind, purpose, addrs, node_id, lookup_id, data,
                                   now + self.cfg.rpc_timeout_s)
        self._emit(addrs[0], data)

    def _send(self, addr: str, msg: Pong | Nodes) -> None:
        self._emit(addr, msg.encode())

    def _emit(self, addr: str, data: bytes) -> None:
        self.stats["msgs_out"] += 1
        self.stats["bytes_out"] += len(data)
        self._out.append((addr, data))
