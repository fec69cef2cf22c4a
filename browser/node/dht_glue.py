"""Pyodide side of a tab's Kademlia carrier (docs/dht.md, "Carriers"; the participant worker
runs it after p2p_glue.py). The tab runs the same shared.dht node as a native node, through
the same shared.dht.carrier.DhtCarrier (addresses, routing, checks, relay signing); only the
way a frame leaves differs: the page (browser/node/dht.js) owns the WebSocket and the data
channels, so frames go out as events posted to it, not returned by a call:

| kind      | fields                                                                    |
|-----------|---------------------------------------------------------------------------|
| send      | msg_type 16, frame: a signed Dht frame for the server's relay (node.js's) |
| dht_send  | to, frame: an unsigned Dht frame for `to`'s open data channel; the page   |
|           | calls dht_undelivered(to, frame) when it could not send it                |
| dht_found | req, target, found, hops, queries, ms: a lookup the page asked for        |

The page starts it (dht_start) when the run's config has `dht` (/api/run; `?dht=0` keeps it
off), tells it which channels are open and whether the socket is (dht_sync, which answers with
the summary for the card), and hands it the Dht frames that arrive on a channel (dht_link).
Dht frames from the server reach it through node_glue's DHT_HOOK (the participant's "dht"
event). The tab's record is signed with its ML-DSA-65 identity (@noble/post-quantum, through
shared.platform, as every signature of the tab).
"""

from __future__ import annotations

import asyncio
from typing import Any

import js  # type: ignore[import-not-found]
from pyodide.ffi import to_js  # type: ignore[import-not-found]

from shared.dht import DhtConfig
from shared.dht.carrier import DhtCarrier
from shared.errors import ProtocolError
from shared.messages import Dht, decode_message
from shared.participant import Participant

Event = dict[str, Any]
# a tab signs every relayed message in JS, and its worker also runs the round's protocol
# logic: a longer RPC timeout than a native node's 1 s before a retry
TAB_CONFIG = DhtConfig(rpc_timeout_s=3.0)
FIND_TIMEOUT_S = 60.0


def _js(events: list[Event]) -> object:
    return to_js(events, dict_converter=js.Object.fromEntries)


class TabDht(DhtCarrier):
    """A tab's carrier: frames leave as events posted to the page (dht.js)."""

    def __init__(self, p: Participant, run_id: str, post: Any, channels: bool) -> None:
        super().__init__(p.identity, run_id, sign=p.frame, channels=channels, config=TAB_CONFIG)
        self.post = post  # JS: (events) -> the page
        self.open: set[str] = set()  # peers whose data channel is open (the page says)

    def emit(self, events: list[Event]) -> None:
        self.post(_js(events))

    def _channel_open(self, peer: str) -> bool:
        return peer in self.open

    async def _send_direct(self, peer: str, frame: bytes) -> bool:
        self.emit([{"kind": "dht_send", "to": peer, "frame": frame}])
        return True  # the page sends it; if it cannot, dht_undelivered relays it

    async def _send_relay(self, frame: bytes) -> None:
        self.emit([{"kind": "send", "msg_type": Dht.TYPE, "frame": frame}])

    def undelivered(self, peer: str, frame: bytes) -> None:
        """The page could not send `frame` on `peer`'s channel: through the relay instead."""
        self.counters["direct_failed"] += 1
        self.open.discard(peer)
        try:
            msg = decode_message(frame, max_payload=1 << 18)
        except ProtocolError:
            return
        if isinstance(msg, Dht):
            self._spawn(self.relay(peer, msg.payload))

    async def find_for_page(self, target: str, req: int) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        out: Event = {"kind": "dht_found", "req": req, "target": target, "found": False,
                      "hops": None, "queries": 0}
        try:
            for _ in range(100):  # dht_start's node starts on the loop's next turn
                if self.service is not None:
                    break
                await asyncio.sleep(0.05)
            r = await asyncio.wait_for(self.find(target), FIND_TIMEOUT_S)
            out.update(found=bool(r.found), hops=r.hops, queries=r.queries)
        except (TimeoutError, asyncio.CancelledError, ValueError, AssertionError) as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        out["ms"] = round((loop.time() - t0) * 1000, 1)
        self.emit([out])


_CARRIERS: dict[int, TabDht] = {}
_POST: list[Any] = []  # the worker's poster, set once by dht_set_post
_STARTS: set[Any] = set()  # tasks kept referenced until done


def _keep(fut: Any) -> None:
    _STARTS.add(fut)
    fut.add_done_callback(_STARTS.discard)


def dht_set_post(post: Any) -> None:
    """participant_worker.js's way to post events to the page outside a call."""
    _POST[:] = [post]


def dht_start(p: Participant, run_id: str, channels: bool) -> None:
    """Start the tab's DHT node for `run_id` (once per run; a new run replaces it)."""
    old = _CARRIERS.get(id(p))
    if old is not None and old.run_id == str(run_id):
        return
    carrier = TabDht(p, str(run_id), _POST[0], bool(channels))
    _CARRIERS[id(p)] = carrier

    async def go() -> None:
        if old is not None:
            await old.close()
        carrier.start()  # needs the running loop (Pyodide's WebLoop)

    _keep(asyncio.ensure_future(go()))


def dht_hook(p: Participant, events: list[Event]) -> list[Event]:
    """node_glue's hook over every call's events: the server's Dht frames go to the carrier."""
    carrier = _CARRIERS.get(id(p))
    out: list[Event] = []
    for ev in events:
        if ev["kind"] != "dht":
            out.append(ev)
        elif carrier is not None:
            carrier.on_relayed(ev["message"])
    return out


def dht_link(p: Participant, peer: str, frame: Any) -> None:
    """A Dht frame from `peer`'s data channel."""
    carrier = _CARRIERS.get(id(p))
    if carrier is not None:
        carrier.on_direct(str(peer), frame.to_bytes())


def dht_undelivered(p: Participant, peer: str, frame: Any) -> None:
    carrier = _CARRIERS.get(id(p))
    if carrier is not None:
        carrier.undelivered(str(peer), frame.to_bytes())


def dht_find(p: Participant, target: str, req: int) -> None:
    """Start a lookup of `target`; its dht_found event is posted when it ends."""
    carrier = _CARRIERS.get(id(p))
    if carrier is None:
        _POST[0](_js([{"kind": "dht_found", "req": int(req), "target": str(target),
                       "found": False, "queries": 0, "ms": 0,
                       "error": "this tab runs no DHT node"}]))
        return
    _keep(asyncio.ensure_future(carrier.find_for_page(str(target), int(req))))


def dht_sync(p: Participant, open_peers: Any, relay_up: bool) -> object:
    """The page's view (open channels, socket up) in; the summary for the card out."""
    carrier = _CARRIERS.get(id(p))
    if carrier is None:
        return _js([])
    carrier.open = {str(x) for x in open_peers.to_py()}
    if relay_up and not carrier.relay_up:
        carrier.relay_restored()  # the socket is back: the bootstrap is pinged at once
    carrier.relay_up = bool(relay_up)
    return _js([{"kind": "dht_summary", **carrier.summary(), "node_id": carrier.me,
                 "channels": len(carrier.open), "relay_up": carrier.relay_up}])


DHT_HOOK = dht_hook
