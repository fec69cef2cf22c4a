"""Client-level DP in a run: the coordinator's Poisson sample and the RoundOpen's noise
fields, refusal of an unsampled update, the epsilon budget stopping a real server (app,
/api/run, /metrics), and the simulator's nodes clipping through the one participant."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bench.simulate import simulate
from server.app import make_app
from server.coordinator import Coordinator
from server.dp_accountant import epsilon
from server.keys import COORDINATOR
from server.runstate import open_run
from shared.dp import poisson_sample
from shared.messages import RoundCommitted, RoundOpen
from tests.test_coordinator import Node, coordinator


async def _until(cond: object, what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _opens(node: Node) -> list[RoundOpen]:
    return [m for m in node.inbox.frames if isinstance(m, RoundOpen)]


async def test_only_the_sampled_trainers_get_the_round(tmp_path: Path) -> None:
    async with coordinator(tmp_path, loop=False, quorum=1, seed=4, dp_clip=2.0,
                           dp_noise_multiplier=1.5, dp_sample_rate=0.5) as coord:
        nodes = [await Node.join_new(coord) for _ in range(8)]
        task = asyncio.create_task(coord.run_rounds())
        try:
            await _until(lambda: coord.state is not None, "the round to open")
            want, draws = poisson_sample(4, 0, sorted(n.ident.node_id for n in nodes), 0.5)
            got = [n for n in nodes if _opens(n)]
            assert sorted(n.ident.node_id for n in got) == sorted(want)
            assert 0 < len(got) < 8  # seed 4 samples some, not all
            for n in got:
                op = _opens(n)[-1]
                assert (op.dp_clip, op.dp_sigma, op.dp_participants) == (2.0, 1.5, len(want))
            left_out = next(n for n in nodes if not _opens(n))
            await left_out.send(left_out.submit())
            err = left_out.error()
            assert (err.code, err.field) == ("bad_update", "node_id")
            for n in got:  # the round commits with the sample alone
                await n.send(n.submit())
            await _until(lambda: coord.run.version == 1, "the commit")
            dp = coord.status()["dp"]
            assert dp["steps"] == draws
            assert dp["epsilon"] == pytest.approx(
                epsilon(sigma=1.5, q=0.5, steps=draws, delta=1e-5))
        finally:
            task.cancel()
            await asyncio.wait([task], timeout=1)


async def test_the_epsilon_budget_stops_a_real_server(tmp_path: Path) -> None:
    """sigma 2, q 1: epsilon 2.17, 3.19, 4.01 after 1, 2, 3 rounds; a budget of 3.5 lets two
    rounds commit and opens no third; /api/run, /metrics and the log say why."""
    run = open_run(tmp_path / "run", {"model": "mlp-digits", "quorum": 1, "deadline_s": 60.0,
                                      "dp_clip": 1.0, "dp_noise_multiplier": 2.0,
                                      "dp_epsilon_budget": 3.5})
    async with TestClient(TestServer(make_app(run))) as client:
        assert isinstance(client.server, TestServer)
        coord: Coordinator = client.server.app[COORDINATOR]
        await _until(lambda: coord.state is not None, "the first round")
        node = await Node.join_new(coord)
        for r in range(2):
            await _until(lambda r=r: any(o.round == r for o in _opens(node)), f"round {r}")
            await node.send(node.submit(round=r))
            await _until(lambda r=r: coord.run.version == r + 1, f"commit {r}")
        await _until(lambda: coord.finished, "the run to stop")
        await asyncio.sleep(0.05)
        assert coord.run.version == 2
        assert not any(o.round == 2 for o in _opens(node))
        final = [m for m in node.inbox.frames if isinstance(m, RoundCommitted)][-1]
        assert final.final
        assert final.round == 1
        resp = await client.get("/api/run")
        body = await resp.json()
        dp = body["dp"]
        assert body["status"] == "finished"
        assert "privacy budget" in body["stop_reason"]
        assert "4.01" in body["stop_reason"]
        assert [row["round"] for row in dp["per_round"]] == [0, 1]
        assert dp["epsilon"] == pytest.approx(3.189, abs=1e-3)
        assert dp["per_round"][0]["epsilon"] == pytest.approx(2.166, abs=1e-3)
        assert dp["epsilon_pld"] <= dp["epsilon"] + 1e-6  # PLD is tighter than RDP
        text = await (await client.get("/metrics")).text()
        assert 'daa_dp_epsilon{accountant="rdp"} 3.18' in text
        assert "daa_dp_steps 2" in text


def test_simulated_nodes_clip_through_the_participant(tmp_path: Path) -> None:
    """The simulator's nodes are the real participant: clipped to 1e-6 with no noise, a round
    leaves the model where it was; without DP the same round moves it."""
    kw = {"nodes": 4, "rounds": 1, "byzantine": 0.0, "attack": "sign-flip",
          "aggregator": "mean", "inner_steps": 5, "progress": False}
    dp = asyncio.run(simulate(**kw, data_dir=tmp_path / "dp",  # type: ignore[arg-type]
                              extra_config={"dp_clip": 1e-6}))
    plain = asyncio.run(simulate(**kw, data_dir=tmp_path / "plain"))  # type: ignore[arg-type]
    for out in (dp, plain):
        assert out["summary"]["node_errors"] == 0
    s_dp, s_plain = dp["summary"], plain["summary"]
    assert np.isclose(s_dp["final_eval_loss"], s_dp["initial_eval_loss"], rtol=1e-4)
    assert s_plain["final_eval_loss"] < s_plain["initial_eval_loss"] - 0.05
