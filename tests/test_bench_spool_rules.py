"""bench.spool_rules in a tiny configuration: every rule, both modes, the same answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_tiny_spool_rules_bench_gives_the_same_answer_in_both_modes() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.spool_rules", "--params", "50000",
                           "--participants", "7"],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fig["bench"] == "spool_rules"
    assert fig["all_same"] is True
    rules = ["krum", "multi-krum", "bulyan", "geometric-median", "centered-clipping",
             "weighted-mean"]
    assert [(r["rule"], r["mode"]) for r in fig["rows"]] == [
        (rule, mode) for rule in rules for mode in ("single", "streamed")]
    for row in fig["rows"]:
        assert row["participants"] == 7
        assert row["f"] == (0 if row["rule"] == "weighted-mean" else 1)
        assert row["held_mb"] == (0.0 if row["mode"] == "streamed" else 1.3)
        assert row["peak_rss_mb"] >= row["baseline_rss_mb"] > 10
    assert set(fig["growth_mb"]) == {f"{r}_{m}_7" for r in rules for m in ("single", "streamed")}


@pytest.mark.timeout(300)
def test_a_real_server_commits_a_streamed_round_with_a_krum_family_rule() -> None:
    """bench.stream, tiny: a real server takes streamed updates and reduces them by Krum from
    the spool (server.reduction -> server.spool_rules), as single frames too. (Bulyan takes
    the same path; tests/test_spool_rules.py checks every rule from the spool bit for bit.)"""
    rule = "krum"
    proc = subprocess.run([sys.executable, "-m", "bench.stream", "--model", "mlp-digits",
                           "--flavour", "", "--participants", "3", "--chunk-mb", "0.01",
                           "--deadline-s", "8", "--rule", rule],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fig["rule"] == rule
    assert [r["mode"] for r in fig["rows"]] == ["single", "streamed"]
    for row in fig["rows"]:
        assert row["acked"] == 3
        assert row["committed_rounds"] == 1
        assert row["rejected"] == {}
        assert row["errors"] == []
        assert row["spool_files_left"] == 0
