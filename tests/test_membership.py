"""Membership and churn on the control channel (real aiohttp server on loopback): late
updates under both stale policies, straggler state in /api/peers, and role checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shared.messages import Ack, Error, RoundCommitted, RoundOpen, Signal, Verdict, Welcome
from tests.test_ws_protocol import serve


async def until(c: Any, cls: type) -> Any:
    """Skip round broadcasts until a `cls` message arrives."""
    while not isinstance(msg := await c.recv(), cls):
        assert isinstance(msg, RoundCommitted | RoundOpen), msg
    return msg


def full(c: Any, value: float) -> np.ndarray:
    return np.full(c.welcome.n_params, value, np.float32)


async def test_late_update_is_dropped_by_default_and_counted(tmp_path: Path) -> None:
    async with serve(tmp_path, quorum=1, deadline_s=60.0) as srv:
        a = await srv.client("a")
        b = await srv.client("b")
        stale = b.submit(full(b, 0.5))  # b trained for round 0 ...
        await a.send(a.submit(full(a, 0.01)))
        assert (await a.expect(Ack)).status == "accepted"
        await b.ws.close()  # ... but b drops out; the round commits without it
        await a.expect(RoundCommitted)
        await a.expect(RoundOpen)
        b2 = await srv.client("b")
        assert b2.open is not None
        assert b2.open.round == 1
        await b2.send(stale)
        err = await b2.error("stale_update")
        assert err.round == 0
        assert "drops late updates" in err.message
        run = await srv.api("/api/run")
        assert run["stale_dropped"] == 1
        assert run["stale_applied"] == 0
        assert run["rejected"].get("stale_update") == 1
        rej = await srv.api("/api/rejections")
        assert [(r["node_id"], r["code"], r["round"]) for r in rej] == [
            (b.node_id, "stale_update", 0)]


async def test_late_update_applied_with_staleness_weight(tmp_path: Path) -> None:
    async with serve(tmp_path, quorum=2, deadline_s=60.0, stale_policy="weight",
                     stale_weight=0.5) as srv:
        a = await srv.client("a")
        b = await srv.client("b")
        c = await srv.client("c")
        late = c.submit(full(c, 0.08))  # c's round-0 update, held back
        await c.ws.close()
        for x, v in ((a, 0.01), (b, 0.03)):
            await x.send(x.submit(full(x, v)))
            assert (await x.expect(Ack)).status == "accepted"
        for x in (a, b):
            await x.expect(RoundCommitted)
            x.open = await x.expect(RoundOpen)
        assert a.open is not None
        theta1 = np.frombuffer(a.open.payload, "<f4")
        c2 = await srv.client("c")
        assert c2.open is not None
        assert c2.open.round == 1
        await c2.send(late)  # round 0's update, one round late: weight 0.5 -> 0.04
        ack = await c2.expect(Ack)
        assert ack.status == "accepted"
        assert ack.round == 0
        await a.send(a.submit(full(a, 0.04)))
        assert (await a.expect(Ack)).status == "accepted"
        await b.send(b.submit(full(b, 0.04)))  # round 1 waits for every connected trainer
        assert (await b.expect(Ack)).status == "accepted"
        done = await a.expect(RoundCommitted)
        assert done.round == 1
        assert done.n_updates == 3
        theta2 = np.frombuffer((await a.expect(RoundOpen)).payload, "<f4")
        # mean(0.04, 0.04, 0.5 * 0.08) = 0.04 with outer lr 1 and no momentum
        np.testing.assert_allclose(theta1 - theta2, 0.04, rtol=1e-4, atol=1e-6)
        run = await srv.api("/api/run")
        assert run["stale_applied"] == 1
        assert run["stale_dropped"] == 0


async def test_straggler_state_and_roles(tmp_path: Path) -> None:
    async with serve(tmp_path, quorum=1, deadline_s=1.0) as srv:
        a = await srv.client("a")
        b = await srv.client("b")
        await a.send(a.submit(full(a, 0.01)))
        assert (await a.expect(Ack)).status == "accepted"
        await a.expect(RoundCommitted)  # at the deadline, without b
        peers = {p["node_id"]: p for p in await srv.api("/api/peers")}
        assert peers[b.node_id]["state"] in ("straggling", "training")
        assert peers[b.node_id]["role"] == "trainer"
        assert peers[b.node_id]["last_seen"] > 0
        # a trainer may not send verdicts
        assert b.welcome is not None
        await b.send(Verdict(run_id=b.welcome.run_id, round=0, node_id=b.node_id,
                             base_loss=1.0, scores=[]))
        assert (await until(b, Error)).code == "bad_update"
        # a validator may not submit
        v = await srv.client("v", hello=False)
        await v.send(v.hello(role="validator"))
        v.welcome = await v.expect(Welcome)
        v.open = await v.expect(RoundOpen)
        await v.send(v.submit(full(v, 0.01)))
        err = await until(v, Error)
        assert err.code == "bad_update"
        assert "validator does not submit" in err.message


async def test_bad_signals_get_typed_errors(tmp_path: Path) -> None:
    """A signal to a node that is not connected, or an offer to the server's peer on a run
    without the star transport, is refused with a typed error; nothing else changes."""
    async with serve(tmp_path, quorum=1, deadline_s=60.0) as srv:
        a = await srv.client("a")
        assert a.welcome is not None
        await a.send(Signal(run_id=a.welcome.run_id, node_id=a.node_id, to="ab" * 32,
                            kind="offer", data="v=0"))
        err = await until(a, Error)
        assert err.code == "unknown_node"
        assert err.field == "to"
        await a.send(Signal(run_id=a.welcome.run_id, node_id=a.node_id, to="server",
                            kind="offer", data="v=0"))
        err = await until(a, Error)
        assert err.code == "bad_update"
        assert "star" in err.message
        run = await srv.api("/api/run")
        assert run["rejected"] == {"unknown_node": 1, "bad_update": 1}
