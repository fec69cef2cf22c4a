"""bench.secagg_run in a tiny configuration: the table and its last-line JSON."""

from __future__ import annotations

import json

import pytest

from bench import secagg_run


def test_tiny_live_secagg_bench(capsys: pytest.CaptureFixture[str]) -> None:
    assert secagg_run.main(["--models", "mlp-digits", "--nodes", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    fig = json.loads(out[-1])
    assert fig["exact"] is True
    assert fig["node_errors"] == 0
    modes = {r["mode"]: r for r in fig["rows"]}
    assert set(modes) == {"plain", "secagg", "dropout"}
    assert modes["dropout"]["dropped"] == 1
    assert fig["up_ratio"]["mlp-digits/3"] > 1  # key messages and masked headers cost bytes
