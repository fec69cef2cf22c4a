"""examples/byo_hf_gpt2.py (GPT-2 from a transformers config, no weights): passes the start
checks and trains natively. Skipped where transformers is not installed (no dependency)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

from ml.workload import resolve
from ml.zoo import evaluate, flatten, load_flat
from native_node.trainer import Trainer


def test_the_transformers_example_checks_and_trains_natively() -> None:
    work = resolve(model="examples.byo_hf_gpt2:build", flavour=None, data="markov",
                   data_path=None, partition="iid", alpha=0.5, seed=0)
    assert work.model_config["task"] == "lm"
    assert work.n_params == 108288
    model = work.new_model()
    theta = flatten(model)
    assert np.array_equal(theta, flatten(work.new_model()))
    x, y = work.dataset.x_val[:64], work.dataset.y_val[:64]
    before = evaluate(model, x, y)
    result = Trainer(work, shard=0, n_shards=1, node_id="n0").train_round(
        theta, steps=20, lr=1e-2, batch_size=16)
    load_flat(model, theta - result.delta)
    assert evaluate(model, x, y) < before - 0.3
