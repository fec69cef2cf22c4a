"""shared/dht/carrier.py, the carrier native nodes and tabs share: three participants on one
event loop, joined by an in-process "server" (it forwards relayed Dht frames as the real
relay does, re-addressed with the sender's id) and in-process "data channels" between some of
them. Checks the routing rules (an open channel first, else the relay at once; a failed
channel send falls back to the relay; nothing while the relay is down), the checks on what
arrives on a channel, and the summary the tab's card shows."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any

from shared.dht import DhtConfig, DhtNode
from shared.dht.aio import DhtHost
from shared.dht.carrier import RELAY, RTC, SERVER_ADDR, DhtCarrier, is_dht_frame
from shared.envelope import Identity
from shared.messages import SERVER, Dht, Message, decode_message

RUN = "ab" * 32
CONFIG = DhtConfig(rpc_timeout_s=2.0)


def unsigned(msg: Message) -> bytes:
    return msg.to_frame()  # the relay here checks nothing: the carrier's routing is tested


class Net:
    """The relay and the channels, in process."""

    def __init__(self) -> None:
        self.carriers: dict[str, Carrier] = {}
        self.channels: set[frozenset[str]] = set()
        self.broken: set[frozenset[str]] = set()  # open, but a send on them fails
        self.server: ServerNode | None = None

    def relay(self, sender: str, frame: bytes) -> None:
        msg = decode_message(frame, max_payload=1 << 18)
        assert isinstance(msg, Dht)
        assert msg.node_id == sender
        if msg.to == SERVER:
            assert self.server is not None
            assert self.server.service is not None
            self.server.service.deliver(RELAY + sender, msg.payload)
        elif msg.to in self.carriers:
            self.carriers[msg.to].on_relayed(Dht(run_id=RUN, node_id=sender, to=msg.to,
                                                 payload=msg.payload))


class ServerNode(DhtHost):
    def __init__(self, net: Net) -> None:
        super().__init__()
        self.net, self.ident = net, Identity.generate()
        self._launch(DhtNode(self.ident, [SERVER_ADDR], now=time.time(), seed=1, config=CONFIG))

    def _send(self, addr: str, data: bytes) -> None:
        to = addr.removeprefix(RELAY)
        if to in self.net.carriers:
            self.net.carriers[to].on_relayed(Dht(run_id=RUN, node_id=SERVER, to=to,
                                                 payload=data))


class Carrier(DhtCarrier):
    def __init__(self, net: Net, channels: bool) -> None:
        super().__init__(Identity.generate(), RUN, sign=unsigned, channels=channels,
                         config=CONFIG)
        self.net = net
        net.carriers[self.me] = self

    def _channel_open(self, peer: str) -> bool:
        return frozenset((self.me, peer)) in self.net.channels

    async def _send_direct(self, peer: str, frame: bytes) -> bool:
        if frozenset((self.me, peer)) in self.net.broken:
            return False
        assert is_dht_frame(frame)
        self.net.carriers[peer].on_direct(self.me, frame)
        return True

    async def _send_relay(self, frame: bytes) -> None:
        self.net.relay(self.me, frame)


async def until(cond: Any, timeout: float = 20) -> None:
    async def wait() -> None:
        while not cond():
            await asyncio.sleep(0.02)
    await asyncio.wait_for(wait(), timeout)


def run(coro: Any) -> None:
    """On a fresh loop in its own thread: also right after the e2e tests in one session, whose
    Playwright (sync API) holds a running loop on the main thread."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result(timeout=60)


def test_carriers_route_over_channels_first_and_the_relay_otherwise() -> None:
    run(routing())


def test_a_channel_frame_must_be_a_dht_frame_from_that_peer_to_us() -> None:
    run(channel_checks())


async def routing() -> None:
    net = Net()
    net.server = ServerNode(net)
    a, b, c = Carrier(net, True), Carrier(net, True), Carrier(net, False)
    assert a.addrs == (RTC + a.me, RELAY + a.me)
    assert c.addrs == (RELAY + c.me,)  # a tab outside a p2p run: the relay only
    try:
        for x in (a, b, c):
            x.start()
        await until(lambda: all(len(x.contacts()) == 2 for x in (a, b, c)))
        net.channels.add(frozenset((a.me, b.me)))
        mark_a, mark_b = dict(a.counters), dict(b.counters)
        assert (await a.find(b.me)).found
        assert a.counters["direct_out"] > mark_a.get("direct_out", 0)  # the channel
        assert b.counters["direct_in"] > mark_b.get("direct_in", 0)
        assert (await a.find(c.me)).found  # c has no channel: relayed at once
        assert c.counters["relay_in"] > 0
        assert c.counters["direct_in"] == 0
        # a channel that fails a send: the message goes through the relay instead
        net.broken.add(frozenset((a.me, b.me)))
        relayed = b.counters["relay_in"]
        assert (await a.find(b.me)).found
        assert b.counters["relay_in"] > relayed
        # the relay down and no channel: nothing leaves, the lookup fails, counted
        net.broken.clear()
        net.channels.clear()
        a.relay_up = False
        r = await a.find(c.me)
        assert not r.found
        assert a.counters["relay_down"] > 0
        s = a.summary()
        assert (s["lookups"], s["found"]) == (4, 3)
        assert s["contacts"] >= 2
    finally:
        hosts: list[DhtHost] = [a, b, c, net.server]
        for h in hosts:
            await h.close()


async def channel_checks() -> None:
    net = Net()
    a, b, c = Carrier(net, True), Carrier(net, True), Carrier(net, True)
    try:
        a.start()
        ping = Dht(run_id=RUN, node_id=b.me, to=a.me, payload=b"{}").to_frame()
        assert a.on_direct(b.me, ping)  # taken (the DHT then refuses the payload itself)
        assert a.counters["direct_in"] == 1
        assert a.on_direct(c.me, ping)  # names b, came on c's channel
        assert a.on_direct(b.me, Dht(run_id=RUN, node_id=b.me, to=c.me,
                                     payload=b"{}").to_frame())  # for someone else
        assert a.counters["refused_direct"] == 2
        assert a.on_direct(b.me, ping[:-3])  # cut short
        assert sum(v for k, v in a.counters.items() if k.startswith("refused_")) == 3
        assert not a.on_direct(b.me, b"DAAP\x01\x0e" + bytes(10))  # a Shard: not the DHT's
    finally:
        for x in (a, b, c):
            await x.close()
