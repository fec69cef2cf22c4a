"""The coordinator under autotune, in memory: the RoundOpen carries the round's budget, cap
and the node's codec; the collection takes exactly that codec; the mean weighs steps; the
decision is recorded and served."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from shared.codecs import get_codec
from shared.messages import RoundCommitted, RoundOpen, sha256_hex
from tests.test_coordinator import Node, coordinator


async def _committed(node: Node) -> RoundCommitted:
    for _ in range(500):
        got = [m for m in node.inbox.frames if isinstance(m, RoundCommitted)]
        if got:
            return got[-1]
        await asyncio.sleep(0.01)
    raise AssertionError("no RoundCommitted")


@pytest.mark.parametrize(("weights", "mean"), [("steps", 0.0325), ("equal", 0.025)])
async def test_roundopen_codec_guard_step_weights_and_the_recorded_decision(
        tmp_path: Path, weights: str, mean: float) -> None:
    async with coordinator(tmp_path, quorum=2, autotune=True, outer_lr=1.0,
                           outer_momentum=0.0, inner_steps=20, batch_size=32,
                           autotune_pin={"codec": "int8-block"},
                           autotune_weights=weights) as coord:
        a, b = await Node.join_new(coord), await Node.join_new(coord)
        opens = [m for m in a.inbox.frames if isinstance(m, RoundOpen)]
        assert opens
        first = opens[-1]
        assert (first.codec, first.time_budget_s, first.inner_steps) == ("int8-block", None, 4)
        theta0 = coord.run.params.copy()
        # the run's codec is not the one this node was given for the round
        await a.send(a.submit())
        err = a.error()
        assert (err.code, err.field) == ("bad_update", "codec")
        int8 = get_codec("int8-block")
        for node, value, samples in ((a, 0.01, 32), (b, 0.04, 96)):  # 1 and 3 steps
            payload = int8.encode(np.full(node.n, value, np.float32))
            await node.send(node.submit(codec="int8-block", payload=payload,
                                        digest=sha256_hex(payload), samples=samples,
                                        compute_s=0.01 * samples / 32))
        await _committed(a)
        # "steps": the mean weighs each update by its steps, (0.01 x 1 + 0.04 x 3) / 4;
        # "equal": (0.01 + 0.04) / 2
        np.testing.assert_allclose(theta0 - coord.run.params, mean, atol=2e-4)
        decisions = coord.run.store.autotune_decisions()
        assert [d["round"] for d in decisions] == [1]
        nodes = decisions[0]["inputs"]["nodes"]
        assert sorted(n["steps"] for n in nodes) == [1, 3]
        assert all(n["bytes_up"] > 0 and n["bytes_down"] > 0 for n in nodes)
        assert coord.status()["autotune"]["decisions"] == 1
        # round 1 opens with the decision: a budget and a step cap
        for _ in range(500):
            opens = [m for m in a.inbox.frames if isinstance(m, RoundOpen) and m.round == 1]
            if opens:
                break
            await asyncio.sleep(0.01)
        nxt = opens[-1]
        s = decisions[0]["settings"]
        assert nxt.time_budget_s == pytest.approx(s["budget_s"])
        assert nxt.inner_steps == s["max_steps"]
        assert nxt.codec == "int8-block"


async def test_autotune_off_changes_nothing(tmp_path: Path) -> None:
    async with coordinator(tmp_path, quorum=1) as coord:
        a = await Node.join_new(coord)
        first = [m for m in a.inbox.frames if isinstance(m, RoundOpen)][-1]
        assert (first.codec, first.time_budget_s, first.inner_steps) == ("", None, 50)
        await a.send(a.submit())
        await _committed(a)
        assert coord.run.store.autotune_decisions() == []
        assert coord.status()["autotune"] == {"enabled": False, "pins": {}}
