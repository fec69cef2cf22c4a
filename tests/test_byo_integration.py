"""The docs' bring-your-own example (examples/byo_digits.py, docs/byo_model.md) trained for a
round by a real `python -m server` and a real `python -m native_node`; a node that did not
allow the factory refuses it; a bad factory stops the server at start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.common import free_port, get_json
from tests.conftest import Procs, wait_for

EXAMPLE = "examples.byo_digits:build"
ROOT = Path(__file__).resolve().parent.parent


def test_the_docs_example_trains_a_round_with_a_native_node(procs: Procs,
                                                            tmp_path: Path) -> None:
    port = free_port()
    procs.server("server", tmp_path / "run", port, "--model", EXAMPLE, "--inner-steps", "20",
                 "--batch-size", "32", "--quorum", "1", "--rounds", "1")
    refused = procs.node("refuses", port)  # no --allow-model: must not import the factory
    assert refused.wait(120) == 2
    assert f"--allow-model {EXAMPLE}" in procs.log("refuses")
    assert "not_allowed" in procs.log("refuses")
    node = procs.node("n0", port, "--allow-model", EXAMPLE)
    rows = wait_for(lambda: get_json(f"http://127.0.0.1:{port}/api/rounds"), 120,
                    "a committed round")
    run = get_json(f"http://127.0.0.1:{port}/api/run")
    assert isinstance(run, dict)
    assert isinstance(rows, list)
    assert run["model"]["name"] == "byo"
    assert run["model"]["factory"] == EXAMPLE
    assert rows[0]["n_updates"] == 1
    assert rows[0]["eval_loss"] < run["eval_loss_init"], (rows, run["eval_loss_init"])
    assert node.wait(60) == 0


def test_a_factory_that_raises_stops_the_server_with_the_reason(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "server", "--data-dir", str(tmp_path / "run"),
                          "--port", str(free_port()), "--model", "tests.test_byo:raises"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "model factory (factory_raised)" in out.stderr
    assert "RuntimeError: no GPU here" in out.stderr
