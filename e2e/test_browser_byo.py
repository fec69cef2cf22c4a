"""The docs' bring-your-own example (examples/byo_digits.py, docs/byo_model.md) in a real
Chromium tab: the tab trains it for a round next to a native node that allowed the factory;
a model whose train step does not export leaves the tab inference-only, saying why."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

EXAMPLE = "examples.byo_digits:build"
RUN = {"model": EXAMPLE, "inner_steps": 5, "batch_size": 16, "quorum": 2, "rounds": 1,
       "deadline_s": 120.0}


def api(server: Any, path: str) -> Any:
    with urllib.request.urlopen(f"{server.url}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def test_a_tab_trains_the_docs_example_for_a_round(make_server: Any, native_node: Any,
                                                   open_tab: Any) -> None:
    server = make_server(RUN)
    native = native_node(server, "--allow-model", EXAMPLE)
    tab = open_tab(f"{server.url}/?backend=wasm", "byo")
    tab.wait("s.state === 'the run is finished'", timeout_s=240)
    rounds = api(server, "/api/rounds")
    assert len(rounds) == 1
    assert rounds[0]["n_updates"] == 2, rounds
    s = tab.stats()
    assert s["accepted"] == 1, s
    assert s["rejected"] == 0, s
    keys = server.call(lambda: server.run.store.update_keys(0))
    assert s["nodeId"] in keys
    assert api(server, "/api/run")["model"]["factory"] == EXAMPLE
    probs = tab.page.evaluate("(px) => window.daaNode.classify(px)", [0.0] * 64)
    assert len(probs) == 10
    assert abs(sum(probs) - 1) < 1e-4
    tab.screenshot("byo-digits")
    assert native.proc.wait(timeout=30) == 0
    assert tab.errors == [], tab.errors


def test_a_model_whose_train_step_does_not_export_is_inference_only(
        make_server: Any, open_tab: Any) -> None:
    server = make_server({**RUN, "model": "tests.test_byo:unexportable_loss", "quorum": 1})
    tab = open_tab(f"{server.url}/?backend=wasm", "byo-infer")
    tab.wait("s.state.startsWith('inference only')", timeout_s=180)
    s = tab.stats()
    assert s["cannotTrain"]["reason"] == "export_failed", s
    assert s["cannotTrain"]["infer"] is True
    assert any("cannot train the run's model: export_failed" in n for n in s["notes"]), s
    assert s["contributed"] == 0
    assert api(server, "/api/run")["peers_connected"] == 0



def test_a_tab_trains_a_transformers_gpt2_for_a_round(make_server: Any, native_node: Any,
                                                      open_tab: Any) -> None:
    """examples/byo_hf_gpt2.py (GPT-2 from a transformers config, no weights) in a tab next
    to a native node; skipped where transformers is not installed (it is no dependency)."""
    import pytest

    pytest.importorskip("transformers")
    factory = "examples.byo_hf_gpt2:build"
    server = make_server({**RUN, "model": factory, "data": "markov", "inner_steps": 4})
    native = native_node(server, "--allow-model", factory)
    tab = open_tab(f"{server.url}/?backend=wasm", "byo-hf")
    tab.wait("s.state === 'the run is finished'", timeout_s=300)
    rounds = api(server, "/api/rounds")
    assert rounds[0]["n_updates"] == 2, rounds
    s = tab.stats()
    assert s["accepted"] == 1, s
    assert s["nodeId"] in server.call(lambda: server.run.store.update_keys(0))
    assert native.proc.wait(timeout=30) == 0
    assert tab.errors == [], tab.errors
