"""bench.browser --models without a browser: the model names it takes, and the parameter
counts it decides unstarted flavours on are the ones a run of that flavour has."""

from __future__ import annotations

import pytest

from bench.browser_llama import flavour_params, parse_models


def test_models_are_llama_flavours() -> None:
    assert parse_models("llama-2m, llama-20m,") == ["2m", "20m"]
    for bad in ("gpt-tiny", "llama-3m", "llama2m"):
        with pytest.raises(ValueError, match="not a llama flavour"):
            parse_models(bad)


@pytest.mark.parametrize("flavour", ["tiny", "2m"])
def test_flavour_params_match_the_runs_model(flavour: str) -> None:
    from ml.workload import resolve

    work = resolve(model="llama", flavour=flavour, data=None, data_path=None,
                   partition="iid", alpha=0.5, seed=0)
    assert flavour_params(flavour) == work.n_params
