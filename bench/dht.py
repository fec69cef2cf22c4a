"""python -m bench.dht: Kademlia peer discovery (shared.dht) at scale, under churn and faults.

`--nodes` DhtNodes of the real shared/dht code in ONE process on shared.dht.memnet's simulated
clock, with real ML-DSA-65 signed peer records (each node verifies each record version it
hears once). The network model (shared.dht.memnet): one-way delay 10 ms + up to 140 ms by
distance between random places in a unit square + Exp(5 ms) jitter; each message lost with
probability `--loss` (1%); a node that leaves drops off without a word. RPC timeout 1 s with
one retransmission; k = 20, alpha = 3.

Phases (simulated time):
  join       the server (a node like any other, address "server") and the others join over
             100 s, each bootstrapping from the server and two earlier nodes; 300 s settle
  churn      `--churn` of the nodes are replaced over 600 s (leave without notice, a new
             identity joins at a new address); lookups throughout
  server     the server leaves for 300 s (joins keep bootstrapping from other nodes); lookups
             throughout; it comes back with an empty table and is re-found through the
             nodes' periodic bootstrap pings
  partition  two random halves cannot reach each other for 900 s, then the link heals;
             after 300 s, lookups from each half for nodes of the other (`partition_healed`:
             >= 99% of them found and every node holds a contact on the other side;
             `partition_heal_s`: when that last became true, checked every 10 s)

A lookup runs from a random node up for >= 30 s, for the id of another such node that stays
up until the lookup ends; success = the target itself answered within the lookup. hops = the
target's depth in the iterative lookup (1: the asker knew it). Lookups during the partition
are not counted (half the targets are unreachable by construction).

Identities (ML-DSA-65 key pairs: pqcrypto has no seeded keygen) are kept in
bench/results/dht-identities-cache.json per seed, so a run is repeatable given its seed: the
same figures every time, wall time aside.

Last line: JSON with nodes, churn, lookups, success_rate, hops_p50, hops_p99,
queries_per_lookup (FindNode requests, retransmissions included), messages_per_lookup
(requests + answers), partition_healed, partition_heal_s, the maintenance traffic per node,
signature verifications, refused records by code, and more.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT, emit, print_table
from shared.dht import DhtConfig, DhtNode, LookupResult
from shared.dht.memnet import MemNet, NetModel
from shared.envelope import Identity

CACHE = ROOT / "bench" / "results" / "dht-identities-cache.json"
UP_BEFORE_S = 30.0  # sources and targets have been up this long
SPARE_S = 60.0  # and targets stay up at least this long after a lookup starts
DOWN_JOINS = 10  # nodes that join while the server is down
PARTITION_S = 900.0  # how long the two halves cannot reach each other


def identities(n: int, seed: int, path: Path = CACHE) -> list[Identity]:
    """n ML-DSA-65 identities for `seed`, generated once and kept in the cache file."""
    doc: dict[str, list[list[str]]] = {}
    if path.exists():
        doc = json.loads(path.read_text())
    have = doc.get(str(seed), [])
    if len(have) < n:
        have = have + [[i.public_key.hex(), i.secret_key.hex()]
                       for i in (Identity.generate() for _ in range(n - len(have)))]
        doc[str(seed)] = have
        path.write_text(json.dumps(doc))
    return [Identity(public_key=bytes.fromhex(pk), secret_key=bytes.fromhex(sk))
            for pk, sk in have[:n]]


def percentile(values: list[int], q: float) -> int | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


@dataclass
class Phase:
    name: str
    results: list[LookupResult] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        ok = [r for r in self.results if r.found]
        hops = [r.hops for r in ok if r.hops is not None]
        n = len(self.results)
        return {"phase": self.name, "lookups": n, "found": len(ok),
                "success": round(len(ok) / n, 4) if n else None,
                "hops_p50": percentile(hops, 0.5), "hops_p99": percentile(hops, 0.99),
                "hops_max": max(hops, default=None),
                "queries": round(sum(r.queries for r in self.results) / n, 2) if n else None}


class Swarm:
    def __init__(self, *, nodes: int, seed: int, loss: float, ids: list[Identity]) -> None:
        self.net = MemNet(NetModel(loss=loss), seed=seed)
        self.rng = random.Random(seed + 1)
        self.ids = ids
        self.next_id = 0
        self.cfg = DhtConfig()
        self.up_since: dict[str, float] = {}  # address -> when it joined
        self.leaves_at: dict[str, float] = {}  # address -> scheduled departure
        self.phase: Phase | None = None
        self.pending: dict[tuple[str, int], tuple[Phase, str]] = {}
        self.targets: dict[tuple[str, int], str] = {}
        self.next_addr = 0
        self.by_purpose: dict[str, tuple[int, int]] = {}  # purpose -> (lookups, queries)
        self.net.on_result = self._on_result
        self.n = nodes

    def _on_result(self, addr: str, r: LookupResult) -> None:
        n, q = self.by_purpose.get(r.purpose, (0, 0))
        self.by_purpose[r.purpose] = (n + 1, q + r.queries)
        key = (addr, r.lookup_id)
        if key in self.pending:
            phase, _ = self.pending.pop(key)
            phase.results.append(r)

    def join(self, addr: str | None = None, *, identity: Identity | None = None) -> str:
        net = self.net
        if addr is None:
            self.next_addr += 1
            addr = f"mem:{self.next_addr}"
        if identity is None:
            identity = self.ids[self.next_id]
            self.next_id += 1
        live = [a for a in net.nodes if a != "server"]
        boot = ["server", *self.rng.sample(live, min(2, len(live)))]
        if addr == "server":
            boot = []
        node = DhtNode(identity, [addr], now=net.now, config=self.cfg, bootstrap=boot,
                       seed=net.node_seed())
        net.add(addr, node)
        self.up_since[addr] = net.now
        return addr

    def leave(self, addr: str) -> None:
        self.net.remove(addr)
        self.up_since.pop(addr, None)
        self.leaves_at.pop(addr, None)

    def eligible(self, *, spare: float = 0.0) -> list[str]:
        now = self.net.now
        return [a for a, t in self.up_since.items() if now - t >= UP_BEFORE_S
                and self.leaves_at.get(a, math.inf) > now + spare]

    def start_lookup(self, phase: Phase, src: str | None = None,
                     among: list[str] | None = None) -> None:
        targets = among if among is not None else self.eligible(spare=SPARE_S)
        sources = [src] if src is not None else self.eligible()
        if not sources or len(targets) < 2:
            return
        s = self.rng.choice(sources)
        t = self.rng.choice([a for a in targets if a != s])
        node = self.net.nodes[s]
        lid = node.lookup(self.net.nodes[t].node_id, self.net.now)
        self.pending[(s, lid)] = (phase, t)
        self.net.flush(s)

    def lookups_over(self, phase: Phase, count: int, seconds: float) -> None:
        t0 = self.net.now
        for i in range(count):
            self.net.at(t0 + seconds * (i + 0.5) / count, lambda: self.start_lookup(phase))


def crossing_now(net: MemNet, side: dict[str, int]) -> int:
    """Nodes that hold a contact on the other side of the partition."""
    return sum(any(side.get(c.addr, 0) != side.get(a, 0) for c in n.table.contacts())
               for a, n in net.nodes.items())


def cross_entries(net: MemNet, side: dict[str, int]) -> int:
    """Table entries, over all nodes, that point to the other side."""
    return sum(side.get(c.addr, 0) != side.get(a, 0)
               for a, n in net.nodes.items() for c in n.table.contacts())


def run(*, nodes: int, churn: float, seed: int, loss: float, lookups: int) -> dict[str, Any]:
    wall0 = time.perf_counter()
    replaced = round(nodes * churn)
    ids = identities(nodes + replaced + DOWN_JOINS + 1, seed)
    sw = Swarm(nodes=nodes, seed=seed, loss=loss, ids=ids)
    net = sw.net
    server_identity = ids[0]
    sw.next_id = 1
    sw.join("server", identity=server_identity)
    def join() -> None:
        sw.join()

    for i in range(1, nodes):
        net.at(net.now + 100.0 * i / nodes, join)
    net.run_for(400)

    phases = {name: Phase(name) for name in ("churn", "server_down", "healed")}
    # churn: `replaced` departures spread over 600 s, each followed by a fresh join
    t0 = net.now
    victims = sw.rng.sample([a for a in net.nodes if a != "server"], replaced)
    for i, victim in enumerate(victims):
        when = t0 + 600.0 * (i + 0.5) / replaced
        sw.leaves_at[victim] = when

        def swap(v: str = victim) -> None:
            sw.leave(v)
            sw.join()

        net.at(when, swap)
    per_phase = lookups // 3
    sw.lookups_over(phases["churn"], per_phase, 600.0)
    net.run_for(620)

    # the server leaves for 300 s, then comes back empty-handed at the same address
    sw.leave("server")
    sw.lookups_over(phases["server_down"], per_phase, 300.0)
    for i in range(DOWN_JOINS):  # joins keep happening meanwhile (not counted as churn)
        net.at(net.now + 30.0 * i + 15.0, join)
    net.run_for(300)
    sw.join("server", identity=server_identity)
    net.run_for(320)  # > bootstrap_s: every node pinged the server once
    server_table = len(net.nodes["server"].table)

    # partition into two random halves for 300 s, then heal
    addrs = sorted(net.nodes)
    half = set(sw.rng.sample(addrs, len(addrs) // 2))
    side = {a: int(a in half) for a in addrs}
    net.partition(side)
    entries_at_split = cross_entries(net, side)
    net.run_for(PARTITION_S)
    # Kademlia forgets a contact only when an RPC to it fails: what no lookup met is still held
    cross_before = crossing_now(net, side)
    entries_before = cross_entries(net, side)
    # nodes that joined during the partition join on one side only: put them on side 0
    net.heal()
    heal_s = None
    for step in range(30):  # how long until every node holds a contact on the other side
        net.run_for(10)
        if heal_s is None and crossing_now(net, side) == len(net.nodes):
            heal_s = 10 * (step + 1)
    sides = {a: side.get(a, 0) for a in net.nodes}
    crossing = crossing_now(net, side)
    healed = phases["healed"]
    t1 = net.now
    for i in range(lookups - 2 * per_phase):
        def cross() -> None:
            src = sw.rng.choice(sw.eligible())
            other = [a for a in sw.eligible(spare=SPARE_S) if sides.get(a, 0) != sides.get(src, 0)]
            if other:
                sw.start_lookup(healed, src=src, among=[*other, src])
        net.at(t1 + 300.0 * (i + 0.5) / max(1, lookups - 2 * per_phase), cross)
    net.run_for(330)

    all_results = [r for p in phases.values() for r in p.results]
    ok = [r for r in all_results if r.found]
    hops = [r.hops for r in ok if r.hops is not None]
    stats: dict[str, int] = {}
    verifications = 0
    for n in net.nodes.values():
        verifications += n.records.verifications
        for k, v in n.stats.items():
            stats[k] = stats.get(k, 0) + v
    rows = [p.row() for p in phases.values()]
    print(f"{nodes} nodes, churn {churn} ({replaced} replaced), loss {loss}, seed {seed}; "
          f"simulated {net.now - 1_800_000_000.0:.0f} s")
    print_table(rows, ["phase", "lookups", "found", "success", "hops_p50", "hops_p99",
                       "hops_max", "queries"])
    refused = {k[len("refused_"):]: v for k, v in sorted(stats.items())
               if k.startswith("refused_")}
    print(f"network: {net.counts}; refused records/messages: {refused or 'none'}")
    print("all lookups by purpose (lookups, mean FindNode queries): " + ", ".join(
        f"{p} {n} ({q / n:.1f})" for p, (n, q) in sorted(sw.by_purpose.items())))
    print(f"the server came back with an empty table and held {server_table} contacts "
          f"320 s later; the {PARTITION_S:.0f} s partition cut the table entries across it "
          f"from {entries_at_split} to {entries_before} (evicted when an RPC to them failed), "
          f"{cross_before} of {len(net.nodes)} nodes still held one; 300 s after it healed "
          f"{crossing} held a live one (all of them after {heal_s} s; entries across: "
          f"{cross_entries(net, side)})")
    sim_s = net.now - 1_800_000_000.0
    queries = sum(r.queries for r in all_results)
    healed_row = healed.row()
    return {
        "nodes": nodes, "churn": round(replaced / nodes, 3), "lookups": len(all_results),
        "success_rate": round(len(ok) / len(all_results), 4) if all_results else 0.0,
        "hops_p50": percentile(hops, 0.5), "hops_p99": percentile(hops, 0.99),
        "hops_max": max(hops, default=None),
        "hops_target_max": round(2 * math.log2(nodes), 2),
        "queries_per_lookup": round(queries / max(1, len(all_results)), 2),
        "messages_per_lookup": round(2 * queries / max(1, len(all_results)), 2),
        "phases": {r["phase"]: {k: r[k] for k in ("lookups", "success", "hops_p50",
                                                  "hops_p99")} for r in rows},
        "server_down_success": phases["server_down"].row()["success"],
        "partition_healed": bool(healed_row["success"] is not None
                                 and healed_row["success"] >= 0.99
                                 and crossing == len(net.nodes)),
        "cross_side_contacts": f"{crossing}/{len(net.nodes)}",
        "partition_heal_s": heal_s,
        "cross_side_contacts_before_heal": f"{cross_before}/{len(net.nodes)}",
        "cross_entries": {"at_split": entries_at_split, "before_heal": entries_before,
                          "after_heal": cross_entries(net, side)},
        "server_table_after_restart": server_table,
        "loss": loss, "seed": seed, "simulated_s": round(sim_s),
        "messages_per_node_per_s": round(net.counts["sent"] / nodes / sim_s, 3),
        "bytes_per_node_per_s": round(stats.get("bytes_out", 0) / nodes / sim_s),
        "record_verifications": verifications,
        "refused": refused,
        "wall_s": round(time.perf_counter() - wall0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dht", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=200)
    p.add_argument("--churn", type=float, default=0.3, help="fraction of nodes replaced")
    p.add_argument("--lookups", type=int, default=1500)
    p.add_argument("--loss", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    emit(run(nodes=args.nodes, churn=args.churn, seed=args.seed, loss=args.loss,
             lookups=args.lookups))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
