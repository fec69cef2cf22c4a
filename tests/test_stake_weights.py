"""Stake-weighted aggregation (issue 19, `aggregation_weights = "stake"`): the server's mean
weighs each accepted update by its node's ledger stake, checked on tiny hand-computed cases;
rules that take no weights, p2p and open admission are config errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest

from bench.ledger import BenchNode, stake
from server.config import RunConfig
from server.coordinator import Coordinator
from server.reduction import ServerReduction
from server.runstate import open_run

STAKED = {"model": "mlp-digits", "aggregation_weights": "stake", "ledger_min_stake": 1,
          "ledger_faucet": 500}


@pytest.mark.parametrize(("overrides", "says"), [
    ({"aggregator": "median"}, "needs a rule that takes weights"),
    ({"aggregator": "trimmed-mean", "byzantine_fraction": 0.2}, "needs a rule that takes"),
    ({"transport": "p2p", "aggregator": "mean"}, "not with transport p2p"),
    ({"ledger_min_stake": 0}, "needs staked admission"),
    ({"aggregation_weights": "samples"}, "must be one of"),
])
def test_stake_weights_refused_where_they_mean_nothing(overrides: dict[str, Any],
                                                       says: str) -> None:
    with pytest.raises(ValueError, match=says):
        RunConfig.from_dict({**STAKED, **overrides})


def test_stake_weights_are_fixed_for_the_run() -> None:
    assert RunConfig.from_dict(STAKED).aggregation_weights == "stake"
    assert RunConfig.from_dict({"model": "mlp-digits"}).aggregation_weights == "equal"


async def test_the_mean_weighs_each_update_by_its_nodes_stake(tmp_path: Path) -> None:
    run = open_run(tmp_path / "run", STAKED)
    coord = Coordinator(run)
    red = coord.reduction
    assert isinstance(red, ServerReduction)
    a, b, c = BenchNode(coord), BenchNode(coord), BenchNode(coord)
    stake(run, a, 1)
    stake(run, c, 3)  # b holds no stake: weight 0
    ids = [a.ident.node_id, b.ident.node_id, c.ident.node_id]
    vecs = dict(zip(ids, [np.array([1.0, 2.0], np.float32), np.array([3.0, 4.0], np.float32),
                          np.array([5.0, 6.0], np.float32)], strict=True))
    state = SimpleNamespace(updates=dict.fromkeys(ids), round=0)
    collection = SimpleNamespace(vectors=vecs)
    out = await red.reduce(cast(Any, state), cast(Any, collection))
    # (1 * [1, 2] + 0 * [3, 4] + 3 * [5, 6]) / 4 = [4, 5]
    assert out is not None
    assert out.tolist() == [4.0, 5.0]
    stake(run, b, 4)  # 1, 4, 3 of 8: (1 + 12 + 15) / 8, (2 + 16 + 18) / 8
    out = await red.reduce(cast(Any, state), cast(Any, collection))
    assert out is not None
    assert out.tolist() == [3.5, 4.5]
    # a round whose nodes hold no stake is retried (None), not averaged equally
    state.updates = {"0" * 64: None}
    collection.vectors = {"0" * 64: np.ones(2, np.float32)}
    assert await red.reduce(cast(Any, state), cast(Any, collection)) is None


async def test_equal_weights_stay_the_default(tmp_path: Path) -> None:
    run = open_run(tmp_path / "run", {"model": "mlp-digits", "ledger_faucet": 500})
    coord = Coordinator(run)
    red = coord.reduction
    assert isinstance(red, ServerReduction)
    a, b = BenchNode(coord), BenchNode(coord)
    stake(run, a, 9)
    ids = [a.ident.node_id, b.ident.node_id]
    state = SimpleNamespace(updates=dict.fromkeys(ids), round=0)
    collection = SimpleNamespace(vectors={ids[0]: np.array([1.0], np.float32),
                                          ids[1]: np.array([3.0], np.float32)})
    out = await red.reduce(cast(Any, state), cast(Any, collection))
    assert out is not None
    assert out.tolist() == [2.0]
