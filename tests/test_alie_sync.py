"""bench.alie_sync: ALIE breaks Krum and the median in synchronous SGD (the paper's setting)."""

from __future__ import annotations

import json

import pytest

from bench.alie_sync import main


def test_alie_breaks_krum_and_the_median_in_synchronous_sgd(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workers", "20", "--byzantine", "0.4", "--steps", "150", "--seeds", "0",
                 "--rules", "krum", "median"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["byzantine"] == 8
    assert figures["z"] == pytest.approx(1.036, abs=1e-3)
    for rule in ("krum", "median"):
        r = figures["rules"][rule]
        assert r["clean_acc"] > 0.85  # both train fine without attackers
        assert r["alie_acc"] < r["clean_acc"] - 0.1  # and lose > 10 points under ALIE
        assert r["alie_loss"] > 3 * r["clean_loss"]
