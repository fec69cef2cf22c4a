"""bench.vs_flower and bench.vs_hivemind: argument checks, how the figures are picked, and tiny
runs of our side; the foreign side (Flower's or hivemind's own venv) runs only where its venv
exists and is skipped with the reason otherwise."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bench import vs_flower, vs_hivemind

NO_FLOWER = vs_flower.flower_missing(vs_flower.DEFAULT_VENV)
NO_HIVEMIND = vs_hivemind.hivemind_missing(vs_hivemind.DEFAULT_VENV)


def _last_json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return out


def test_vs_flower_arguments() -> None:
    args = vs_flower.parse([])
    assert (args.clients, args.rounds, args.inner_steps, args.engines) == (1000, 3, 50, ["ray"])
    assert vs_flower.parse(["--engines", "ray,asyncio"]).engines == ["ray", "asyncio"]
    with pytest.raises(SystemExit):
        vs_flower.parse(["--engines", "threads"])
    with pytest.raises(SystemExit):
        vs_flower.parse(["--clients", "0"])


def test_vs_flower_our_side_reports_rounds_and_tree_memory(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert vs_flower.main(["--skip-flower", "--clients", "3", "--rounds", "2",
                           "--inner-steps", "2", "--engines", "asyncio"]) == 0
    figures = _last_json(capsys)
    assert set(figures) == {"ours", "clients", "rounds", "inner_steps"}  # no Flower: no ratios
    ours = figures["ours"]
    assert ours["engine"] == "asyncio"
    assert len(ours["rounds_s"]) == 2
    assert ours["round_s"] == pytest.approx(sum(ours["rounds_s"]) / 2, abs=0.01)
    assert 0 < ours["total_round_s"] <= ours["wall_s"]
    assert ours["peak_mb"] > 50  # a python process with torch and a run, not 0
    assert ours["final_eval_loss"] is not None


@pytest.mark.skipif(NO_FLOWER is not None, reason=NO_FLOWER or "")
def test_flower_side_trains_every_client() -> None:
    out = vs_flower.run_flower(venv=vs_flower.DEFAULT_VENV, clients=3, rounds=2,
                               inner_steps=2, timeout=600)
    assert len(out["rounds_s"]) == 2
    assert out["flwr"] == vs_flower.FLWR_VERSION
    assert out["final_accuracy"] > 0.2  # it learned: every client's update came back


def test_vs_hivemind_arguments() -> None:
    args = vs_hivemind.parse([])
    assert (args.peers, args.size, args.ours) == ([4, 16], 1_000_000, list(vs_hivemind.OURS))
    with pytest.raises(SystemExit):
        vs_hivemind.parse(["--ours", "zip:1"])
    with pytest.raises(SystemExit):
        vs_hivemind.parse(["--ours", "raw32:0"])
    with pytest.raises(SystemExit):
        vs_hivemind.parse(["--peers", "1"])


def _row(side: str, config: str, peers: int, round_s: float, mb: float, rel: float
         ) -> dict[str, Any]:
    return {"side": side, "config": config, "peers": peers, "round_s": round_s,
            "MB_per_peer": mb, "rel_err": rel, "max_abs_err": rel * 4}


def test_vs_hivemind_picks_the_fastest_configuration_at_equal_error() -> None:
    rows = [_row("hivemind", "none", 4, 0.30, 6.0, 1e-7),
            _row("hivemind", "8bit", 4, 0.20, 1.5, 2e-2),  # faster, but lossy
            _row("ours", "raw32:1", 4, 2.0, 7.0, 1e-7),
            _row("ours", "fp16:1", 4, 1.5, 5.0, 3e-4),
            _row("ours", "raw32:1", 16, 0.1, 1.0, 1e-7)]
    figures = vs_hivemind.summarize(rows, [4, 16], exact_err=1e-6)
    assert figures["hivemind"]["4"]["config"] == "none"
    assert figures["ours"]["4"]["config"] == "raw32:1"
    assert figures["lossy"]["4"]["hivemind"]["config"] == "8bit"
    assert figures["lossy"]["4"]["ours"]["config"] == "fp16:1"
    assert figures["faster_at_no_more_bytes"] == {"4": False}  # 16: no hivemind row
    assert figures["hivemind"]["16"] is None


def test_our_p2p_reduction_averages_exactly_over_data_channels(
        capsys: pytest.CaptureFixture[str]) -> None:
    size = 20_000
    assert vs_hivemind.main(["--skip-hivemind", "--peers", "3", "--size", str(size),
                             "--rounds", "1", "--ours", "raw32:1", "fp16:1"]) == 0
    figures = _last_json(capsys)
    assert set(figures) == {"hivemind", "ours", "lossy", "configs", "size", "rounds",
                            "faster_at_no_more_bytes"}
    raw, fp16 = figures["configs"]
    assert raw["rel_err"] < 1e-6  # the mean of three float32 tensors, to float32 rounding
    assert 1e-6 < fp16["rel_err"] < 1e-3  # results rounded to 11 significant bits
    u_mb = size * 4 / 1e6
    # each peer sends its two foreign slices and its reduced shard to two peers and the server
    assert raw["MB_per_peer"] >= (2 / 3 + 3 / 3) * u_mb
    assert fp16["MB_per_peer"] < raw["MB_per_peer"]
    assert figures["ours"]["3"]["config"] == "raw32:1"
    assert figures["hivemind"]["3"] is None


@pytest.mark.skipif(NO_HIVEMIND is not None, reason=NO_HIVEMIND or "")
def test_hivemind_side_averages() -> None:
    out = vs_hivemind.run_hivemind(venv=vs_hivemind.DEFAULT_VENV, peers=2, size=10_000,
                                   compression="none", rounds=1)
    assert out["rel_err"] < 1e-6
    assert out["MB_per_peer"] == pytest.approx(2 * 0.5 * 10_000 * 4 / 1e6, rel=0.1)
