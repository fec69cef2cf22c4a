"""bench.simulate with SparseLoCo and overlap: the simulated participants (numpy, as native
nodes) say `sparse-step`, take "sparse" RoundOpens after their join and hold the server's
params bit for bit (no resync), and in an `overlap` run train ahead after each Submit and
merge those steps into the next round; every round commits with every update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.simulate import main


def run(capsys: pytest.CaptureFixture[str], tmp_path: Path, *extra: str) -> dict[str, object]:
    assert main(["--nodes", "3", "--rounds", "3", "--inner-steps", "4", "--outer", "sparseloco",
                 "--data-dir", str(tmp_path), "--quiet", *extra]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return out


def test_sparse_steps_without_and_with_overlap(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    plain = run(capsys, tmp_path / "plain")
    assert plain["rounds"] == 3
    # round 0's params on join, then the sparse step of rounds 1 and 2 to each of 3 nodes
    assert plain["downlink"] == {"full": 3, "delta": 0, "sparse": 6, "outer": 0, "resyncs": 0}
    assert (plain["ahead_merges"], plain["steps_ahead"]) == (0, 0)
    ahead = run(capsys, tmp_path / "ahead", "--overlap", "--ahead-steps", "3")
    assert ahead["rounds"] == 3
    assert ahead["downlink"] == plain["downlink"]
    # after each Submit 3 steps ahead (3 nodes x 3 rounds); rounds 1 and 2 merged them
    assert ahead["steps_ahead"] == 27
    assert ahead["ahead_merges"] == 6
    assert ahead["final_eval_loss"] != plain["final_eval_loss"]  # the steps ahead count
    assert isinstance(ahead["final_eval_loss"], float)
    assert ahead["final_eval_loss"] < 2.30  # it learns (initial loss ~2.31 on digits)
