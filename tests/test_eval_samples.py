"""Run option eval_samples: the server's eval loss over the first N held-out examples."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml.zoo import evaluate, load_flat
from server.config import RunConfig
from server.runstate import open_run


def test_eval_samples_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="eval_samples"):
        RunConfig.from_dict({"eval_samples": -1})


def test_eval_loss_is_over_the_first_eval_samples_examples(tmp_path: Path) -> None:
    run = open_run(tmp_path / "a", {"model": "mlp-digits", "eval_samples": 5})
    ds = run.work.dataset
    model = run.work.new_model()
    load_flat(model, run.params)
    first5 = evaluate(model, ds.x_val[:5], ds.y_val[:5])
    everything = evaluate(model, ds.x_val, ds.y_val)
    assert first5 != pytest.approx(everything)  # the two differ, so the check means something
    assert run.eval_loss_init == pytest.approx(first5)
    assert run.evaluate(run.params) == pytest.approx(first5)
    whole = open_run(tmp_path / "b", {"model": "mlp-digits"})  # 0 (default): all of them
    assert whole.eval_loss_init == pytest.approx(everything)
