"""Pyodide side of a tab in a `p2p` run (the participant worker runs it after node_glue.py).

The tab does what native_node/p2p.py does for a native node, with the same sans-I/O pieces
(shared.p2p): it keeps its update when the participant says `ready`, runs a
shared.p2p.ShardReducer on the round's ShardPlan, reduces the shards it owns with the JS
kernel (p2p_kernels.js, in this worker: never on the page's main thread) and, at the next
RoundOpen, applies the outer step itself (p2p_kernels.outerStep, the numpy path's float32
arithmetic) and checks the result against the params digest; a mismatch makes the participant
reconnect for the full params and momentum (a resync, counted).

The page (node.js + mesh.js) owns the RTCPeerConnections. Events this adds for it:

| kind        | fields                                                                  |
|-------------|-------------------------------------------------------------------------|
| mesh        | peers (direct channels to open, shared.p2p_mesh), ice_servers, round    |
| shard_out   | to, frame: a signed Shard for a member: its channel, else the socket    |
| p2p_round   | round, owned, bytes_out, bytes_in, update, reduce_ms, resyncs: the tab  |
|             | holds the round's aggregate                                             |

Frames that arrive on a peer's channel come back through `p2p_link(p, peer, frame)`.

Secure p2p runs (`secagg`, shared.secagg.p2p): the participant's `ready` carries the MASKED
u32 words (its `_masked_ready`); on a plan of rule `secagg-sum` the tab runs TabSecAggReducer
(slices of those words to the owners; as an owner, the ring sum in JS, p2p_kernels.ringSum,
uploaded to the server); a directly received slice of the wrong length is handed to the
server signed (SecAgg stage `accuse`), as native owners do. Such runs send every trainer the
full params and momentum in its RoundOpen (`full+m`), so the tab takes no outer step there.
"""

from __future__ import annotations

import time
from typing import Any

import daa_bridge  # type: ignore[import-not-found]  # registered by pyodide_host.js
import js  # type: ignore[import-not-found]
from pyodide.ffi import to_js  # type: ignore[import-not-found]

from shared.downlink import OUTER, is_outer_step, resolve
from shared.errors import BadUpdate, ProtocolError
from shared.hierarchy import GroupReducer, is_group_plan, parse_plan
from shared.messages import (
    SERVER,
    RoundOpen,
    SecAgg,
    Shard,
    ShardPlan,
    decode_message,
    sha256_hex,
)
from shared.p2p import Plan, ShardKernel, ShardReducer
from shared.p2p_mesh import TAB_MAX_PEERS, direct_peers
from shared.participant import Participant
from shared.secagg.p2p import ACCUSE_STAGE, SECAGG_RULE, BadMaskedSlice, SecAggShardReducer
from shared.vec import from_bytes, to_bytes

Event = dict[str, Any]


class TabSecAggReducer(SecAggShardReducer):
    """shared.secagg.p2p's member/owner, with the owner's ring sum in the JS kernel (the
    same bytes as shared.secagg.p2p.ring_sum: tests/test_p2p_tabs.py)."""

    def __init__(self, me: str, plan: Plan, masked: bytes, kernel: ShardKernel) -> None:
        super().__init__(me, plan, masked)
        self.sum_kernel = kernel

    def _reduce_ready(self) -> list[Event]:
        out: list[Event] = []
        for s in self.plan.owned_by(self.me):
            got = self.parts.get(s, {})
            if s in self.reduced or not all(m in got for m in self.plan.members):
                continue
            res = self.sum_kernel(SECAGG_RULE, 0, "raw32", [got[m] for m in self.plan.members])
            self.reduced[s] = self.shards[s] = res
            out.append({"kind": "result", "to": "server", "shard": s, "payload": res,
                        "digest": sha256_hex(res)})
        return out

    @property
    def summed(self) -> bool:
        """Every shard this owner holds is summed and uploaded."""
        return all(s in self.reduced for s in self.plan.owned_by(self.me))


class TabP2P:
    """One tab's p2p role (the twin of native_node.p2p.P2PRole, minus the links)."""

    def __init__(self, p: Participant, cap: int | None = TAB_MAX_PEERS) -> None:
        self.p, self.cap = p, cap
        self.delta: bytes | None = None  # our update (float32 LE) for `delta_round`
        self.delta_round = -1
        self.reducer: ShardReducer | None = None
        self.early: list[Shard] = []  # shard traffic that came before its plan
        self.aggregate: bytes | None = None  # the last round's aggregate (float32 LE)
        self.aggregate_round = -1
        self.momentum: bytes | None = None  # outer momentum (from the server, then ours)
        self.reduce_ms: list[float] = []  # the JS kernel's time per owned shard
        self.resyncs = 0  # outer steps that did not reproduce the server's params
        self.outer_steps = 0  # outer steps applied here that did
        self.lie_round = -1  # fault injection (e2e tests): results of this round are altered
        self.frames: dict[tuple[str, int, int], bytes] = {}  # secure p2p: signed direct parts
        self.accused = 0  # secure p2p: bad masked slices handed to the server
        self.group = TabGroup(self)  # grouped runs (p2p_groups): a plain member
        p.resolver = self.params

    # -- the participant's events -----------------------------------------------------------
    def on_events(self, events: list[Event]) -> list[Event]:
        out: list[Event] = []
        for ev in events:
            if ev["kind"] == "ready":
                self.delta, self.delta_round = bytes(ev["delta"]), int(ev["round"])
                out.append({"kind": "ready", "round": ev["round"]})  # the bytes stay here
            elif ev["kind"] == "p2p":
                out += self.on_message(ev["message"])
            else:
                out.append(ev)
        return out

    def on_message(self, msg: ShardPlan | Shard) -> list[Event]:
        try:
            if isinstance(msg, ShardPlan) and is_group_plan(msg.plan):
                return self.group.on_plan(msg)
            if isinstance(msg, Shard) and self.group.reducer is not None:
                return self.group.on_shard(msg)
            return self.on_plan(msg) if isinstance(msg, ShardPlan) else self.on_shard(msg)
        except (ProtocolError, ValueError) as exc:
            return [{"kind": "refused", "message": f"p2p {type(msg).__name__}: {exc}"}]

    def on_link(self, peer: str, frame: bytes) -> list[Event]:
        """A frame on `peer`'s data channel (its SDP came attested through the server): it
        must be a Shard from `peer`."""
        try:
            msg = decode_message(frame, max_payload=len(frame) + 1024)
        except ProtocolError as exc:
            return [{"kind": "refused", "message": f"bad frame on {peer[:12]}'s channel: {exc}"}]
        if not isinstance(msg, Shard) or msg.node_id != peer:
            return [{"kind": "refused", "message": f"unexpected {type(msg).__name__} on "
                                                   f"{peer[:12]}'s channel"}]
        if msg.kind == "part" and (self.reducer is None
                                   or isinstance(self.reducer, SecAggShardReducer)):
            self.frames[(peer, msg.round, msg.shard)] = frame  # kept signed: the evidence
        return self.on_message(msg)

    # -- the round ----------------------------------------------------------------------------
    def _kernel(self, rule: str, f: int, codec: str, slices: list[bytes]) -> bytes:
        arr = js.Array.new()
        for s in slices:
            arr.push(to_js(s))
        t0 = time.perf_counter()
        res = bytes(daa_bridge.reduceShard(rule, f, codec, arr).to_bytes())
        self.reduce_ms.append((time.perf_counter() - t0) * 1000)
        if self.reducer is not None and self.reducer.plan.round == self.lie_round:
            res = res[:-2] + bytes([res[-2] ^ 1]) + res[-1:]  # the last value's lowest bit
        return res

    def on_plan(self, msg: ShardPlan) -> list[Event]:
        plan = Plan.from_dict(msg.plan)
        me = self.p.node_id
        if me not in plan.members:
            if self.reducer is not None and self.reducer.plan.round == plan.round:
                self.reducer = None  # dropped from this round's reduction
            return []
        if self.delta is None or self.delta_round != msg.round:
            return [{"kind": "refused", "message": f"round {msg.round}: a shard plan, but this "
                                                   "tab holds no update for it"}]
        welcome = self.p.welcome
        ice = [dict(s) for s in welcome.ice_servers] if welcome is not None else []
        out: list[Event] = [{"kind": "mesh", "round": plan.round, "ice_servers": ice,
                             "peers": direct_peers(plan.members, me, self.cap)}]
        self.frames = {k: f for k, f in self.frames.items() if k[1] >= plan.round}
        r = self.reducer
        if r is not None and r.plan.round == plan.round and plan.revision > r.plan.revision:
            events = r.revise(plan)
        elif msg.rule == SECAGG_RULE:  # secure aggregation: self.delta holds masked words
            self.reducer = r = TabSecAggReducer(me, plan, self.delta, self._kernel)
            events = r.start()
        else:
            self.reducer = r = ShardReducer(me, plan, from_bytes(self.delta), rule=msg.rule,
                                            byzantine_fraction=msg.byzantine_fraction,
                                            result_codec=msg.result_codec, kernel=self._kernel)
            events = r.start()
        out += self._route(events)
        early, self.early = self.early, []
        for m in early:
            out += self.on_shard(m)
        return out

    def on_shard(self, msg: Shard) -> list[Event]:
        r = self.reducer
        if r is None or msg.round != r.plan.round:
            if r is None or msg.round > r.plan.round:
                self.early.append(msg)
                del self.early[:-10_000]  # bounded
            return []
        try:
            if msg.kind == "part":
                events = r.on_part(msg.node_id, msg.shard, msg.payload)
            else:
                events = r.on_result(msg.shard, msg.payload)
        except BadMaskedSlice as exc:  # secure p2p: hand the signed slice to the server
            frame = self.frames.pop((msg.node_id, msg.round, msg.shard), None)
            out: list[Event] = [{"kind": "refused", "message": f"round {msg.round}: {exc.message}"}]
            if frame is not None and self.p.welcome is not None:
                self.accused += 1
                acc = SecAgg(run_id=self.p.welcome.run_id, round=msg.round, node_id=self.p.node_id,
                             stage=ACCUSE_STAGE, payload=frame)
                out.append({"kind": "send", "msg_type": SecAgg.TYPE, "frame": self.p.frame(acc)})
            return out
        except ValueError as exc:
            if msg.revision > r.plan.revision:  # sent under a plan we do not have yet
                self.early.append(msg)
                return []
            return [{"kind": "refused", "message": f"round {msg.round}: shard {msg.shard} "
                                                   f"{msg.kind} from {msg.node_id[:12]}: {exc}"}]
        out = self._route(events)
        if isinstance(r, TabSecAggReducer) and events and r.summed:
            out.append({"kind": "p2p_round", "round": r.plan.round, "secagg": True,
                        "owned": r.plan.owned_by(self.p.node_id), "bytes_out": r.bytes_out,
                        "bytes_in": r.bytes_in, "update": len(r.raw),
                        "reduce_ms": list(self.reduce_ms[-4:]), "accused": self.accused})
        if r.done and self.aggregate_round != r.plan.round:
            self.aggregate = to_bytes(r.aggregate())
            self.aggregate_round = r.plan.round
            out.append({"kind": "p2p_round", "round": r.plan.round,
                        "owned": r.plan.owned_by(self.p.node_id), "bytes_out": r.bytes_out,
                        "bytes_in": r.bytes_in, "update": len(r.raw),
                        "reduce_ms": list(self.reduce_ms[-4:]), "resyncs": self.resyncs,
                        "outer_steps": self.outer_steps})
        return out

    def _route(self, events: list[Event]) -> list[Event]:
        r = self.reducer
        assert r is not None
        assert self.p.welcome is not None
        out: list[Event] = []
        for e in events:
            msg = Shard(run_id=self.p.welcome.run_id, round=r.plan.round, node_id=self.p.node_id,
                        to=e["to"], kind=e["kind"], shard=e["shard"], revision=r.plan.revision,
                        payload=e["payload"])
            frame = self.p.frame(msg)
            if e["to"] == SERVER:
                out.append({"kind": "send", "msg_type": Shard.TYPE, "frame": frame})
            else:
                out.append({"kind": "shard_out", "to": e["to"], "frame": frame})
        return out

    # -- the next round's params --------------------------------------------------------------
    def params(self, msg: RoundOpen, held: Any, held_digest: str | None) -> Any:
        """theta for `msg`: with the momentum, full, a delta, or our own outer step."""
        if msg.with_momentum:
            n = len(msg.payload) // 8
            self.momentum = bytes(msg.payload[4 * n:])
            return from_bytes(msg.payload[:4 * n])
        if msg.base_digest is not None and is_outer_step(msg.payload):
            agg = self.aggregate if self.aggregate_round == msg.round - 1 else None
            if held is None or held_digest != msg.base_digest or agg is None \
                    or self.momentum is None:
                self.resyncs += 1
                raise BadUpdate("outer step: this tab lacks the params, momentum or aggregate",
                                field="payload")
            _, _, lr, mu, nesterov = OUTER.unpack(msg.payload)
            out = daa_bridge.outerStep(to_js(to_bytes(held)), to_js(agg), to_js(self.momentum),
                                       lr, mu, bool(nesterov))
            theta = bytes(out.theta.to_bytes())
            if sha256_hex(theta) != msg.params_digest:
                self.resyncs += 1
                raise BadUpdate("outer step: result does not match the params digest",
                                field="params_digest")
            self.momentum = bytes(out.m.to_bytes())
            self.outer_steps += 1
            return from_bytes(theta)
        return resolve(msg, held, held_digest)


class TabGroup:
    """A tab in a grouped run (p2p_groups): native_node/group.py's member side, with the same
    shared.hierarchy.GroupReducer. Tabs are never elected aggregators (shared.hierarchy.elect
    takes capable, i.e. native, members only): the tab sends its update to its group's two
    aggregators (direct channel, else the server relay), takes the combined aggregate that
    they forward, and the next RoundOpen's outer step is TabP2P.params's."""

    def __init__(self, role: TabP2P) -> None:
        self.role = role
        self.reducer: GroupReducer | None = None
        self.group = -1

    def on_plan(self, msg: ShardPlan) -> list[Event]:
        role, me = self.role, self.role.p.node_id
        plan, group, digests = parse_plan(msg.plan)
        if me not in plan.members:
            if self.reducer is not None and self.reducer.plan.round == plan.round:
                self.reducer = None  # dropped from this round's reduction
            return []
        if role.delta is None or role.delta_round != msg.round:
            return [{"kind": "refused", "message": f"round {msg.round}: a group plan, but this "
                                                   "tab holds no update for it"}]
        r = self.reducer
        if r is not None and r.plan.round == plan.round and plan.revision > r.plan.revision:
            events = r.revise(plan)
        else:
            self.reducer = r = GroupReducer(me, plan, digests, from_bytes(role.delta),
                                            rule=msg.rule,
                                            byzantine_fraction=msg.byzantine_fraction,
                                            result_codec=msg.result_codec)
            self.group = group
            events = r.start()
        if r.aggregating:  # cannot happen with shared.hierarchy.elect; refused, not guessed
            self.reducer = None
            return [{"kind": "refused", "message": f"round {msg.round}: a tab cannot aggregate"}]
        welcome = role.p.welcome
        ice = [dict(s) for s in welcome.ice_servers] if welcome is not None else []
        out: list[Event] = [{"kind": "mesh", "round": plan.round, "ice_servers": ice,
                             "group": group, "peers": [a for a in plan.owners[0] if a != me]}]
        out += self._route(events)
        early, role.early = role.early, []
        for m in early:
            out += self.on_shard(m)
        return out

    def on_shard(self, msg: Shard) -> list[Event]:
        r, role = self.reducer, self.role
        if r is None or msg.round != r.plan.round:
            if r is None or msg.round > r.plan.round:
                role.early.append(msg)
                del role.early[:-1000]  # bounded
            return []
        try:
            if msg.kind == "part":
                r.on_part(msg.node_id, msg.payload)  # raises: a tab does not aggregate
            r.on_forward(msg.node_id, msg.payload)
        except ValueError as exc:
            return [{"kind": "refused", "message": f"round {msg.round}: group {msg.kind} "
                                                   f"from {msg.node_id[:12]}: {exc}"}]
        agg = r.aggregate()
        if agg is None or role.aggregate_round == r.plan.round:
            return []
        role.aggregate, role.aggregate_round = to_bytes(agg), r.plan.round
        return [{"kind": "p2p_round", "round": r.plan.round, "group": self.group, "owned": [],
                 "bytes_out": r.bytes_out, "bytes_in": r.bytes_in, "update": len(r.raw),
                 "reduce_ms": [], "resyncs": role.resyncs, "outer_steps": role.outer_steps}]

    def _route(self, events: list[Event]) -> list[Event]:
        r, p = self.reducer, self.role.p
        assert r is not None
        assert p.welcome is not None
        out: list[Event] = []
        for e in events:  # the tab's update to its aggregators (never to the server)
            frame = p.frame(Shard(run_id=p.welcome.run_id, round=r.plan.round, node_id=p.node_id,
                                  to=e["to"], kind=e["kind"], shard=self.group,
                                  revision=r.plan.revision, payload=e["payload"]))
            out.append({"kind": "shard_out", "to": e["to"], "frame": frame})
        return out


_ROLES: dict[int, TabP2P] = {}


def p2p_hook(p: Participant, events: list[Event]) -> list[Event]:
    """node_glue's hook over every call's events: a p2p run's Welcome gives the tab its role."""
    for ev in events:
        if ev["kind"] == "welcome" and ev.get("transport") == "p2p" and id(p) not in _ROLES:
            _ROLES[id(p)] = TabP2P(p)
    role = _ROLES.get(id(p))
    return role.on_events(events) if role is not None else events


def p2p_link(p: Participant, peer: str, frame: Any) -> object:
    """A frame from `peer`'s data channel -> the events it causes (as JS objects)."""
    role = _ROLES.get(id(p))
    events = role.on_link(str(peer), frame.to_bytes()) if role is not None else [
        {"kind": "refused", "message": "a shard frame, but this run is not p2p"}]
    return to_js(events, dict_converter=js.Object.fromEntries)


def p2p_cap(p: Participant, cap: int) -> None:
    """This tab's cap on direct channels (the page's `?p2p_cap=N`, e.g. a weak device)."""
    role = _ROLES.get(id(p))
    if role is not None and int(cap) >= 0:
        role.cap = int(cap)


def p2p_lie(p: Participant, round_: int) -> None:
    """Fault injection for the e2e tests: this tab's reduced shards of `round_` are wrong."""
    role = _ROLES.get(id(p))
    if role is not None:
        role.lie_round = int(round_)


P2P_HOOK = p2p_hook
