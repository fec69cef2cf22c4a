"""server.spool_cc: centered clipping of spooled updates runs column block by block (its
estimate between steps in a scratch file beside the spool, gone afterwards; the reference read
by blocks), so its own allocations are blocks and the float32 result, and its answer and its
errors are the in-memory rule's."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server import spool_cc
from server.spool import Spool
from server.spool_geomed import Scratch
from server.spool_rules import SpooledStack, aggregate
from shared.aggregation import _stack, get_rule

D = 300_000  # 1.2 MB float32, 2.4 MB float64


def _spool(folder: Path, vectors: list[np.ndarray]) -> list[np.ndarray]:
    spool = Spool(folder)
    return [spool.store_vector(f"{i:064x}", 3, v) for i, v in enumerate(vectors)]


def _round(n: int, d: int, seed: int) -> list[np.ndarray]:
    """Honest updates around a base, one huge and one sign-flipped: clipped and not."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(d).astype(np.float32)
    rows = [base + rng.standard_normal(d).astype(np.float32) * np.float32(0.05)
            for _ in range(n)]
    rows[0] = rng.standard_normal(d).astype(np.float32) * np.float32(1e3)
    rows[1] = -rows[2] * np.float32(4.0)
    return rows


def _files(folder: Path) -> list[str]:
    return sorted(p.suffix for p in folder.iterdir())


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("with_reference", [False, True])
def test_memory_is_blocks_and_the_result_and_the_scratch_files_go(
        tmp_path: Path, steps: int, with_reference: bool) -> None:
    vectors = _round(12, D, seed=steps)
    params: dict[str, Any] = {"tau": 1.0, "iterations": steps}
    if with_reference:
        params["reference"] = vectors[3] * np.float32(0.5)
    want = get_rule("centered-clipping")(vectors, **params)
    maps = _spool(tmp_path / "spool", vectors)
    del vectors
    tracemalloc.start()
    try:
        got = aggregate("centered-clipping", maps, f=0, chunk=64 * 2**10 // 12, **params)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, want)
    result_mb = 4 * D / 2**20
    # the stack's float64 blocks (~4 MiB, as every rule) + the float32 result: ~5.3 MB here;
    # the estimate and the sum as float64 vectors (before spool_cc): 4.8 MB more, and a
    # reference listed as Python floats (check_reference) ~9.6 MB more
    assert peak < 4.5 + result_mb + 2.0, peak
    assert _files(tmp_path / "spool") == [".f32"] * 12


@pytest.fixture(params=[1, 3], ids=lambda b: f"{b}blocks")
def blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The rule's column blocks cut d = 5,003 into 1 or 3 blocks (the last one shorter)."""
    monkeypatch.setattr(_stack, "_BLOCK_VALUES", 1)
    monkeypatch.setattr(_stack, "_MIN_WIDTH", -(-5_003 // request.param) + 1)
    return int(request.param)


REFERENCES = ["none", "float32", "float64", "list", "zeros"]


@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize(("tau", "steps"), [(0.3, 1), (0.3, 2), (5.0, 4), (1e9, 3)])
def test_every_step_count_and_reference_kind_gives_the_rules_bits(
        tmp_path: Path, blocks: int, reference: str, tau: float, steps: int) -> None:
    """Steps 1 to 4 (no file, one, two alternating), clipping everything or nothing, and every
    kind of reference the rule takes: the in-memory rule's result, bit for bit."""
    vectors = _round(7, 5_003, seed=blocks * 10 + steps)
    rng = np.random.default_rng(steps)
    ref: Any = {
        "none": None,
        "float32": rng.standard_normal(5_003).astype(np.float32),
        "float64": rng.standard_normal(5_003) * 0.3,
        "list": [float(x) for x in rng.standard_normal(5_003)],
        "zeros": np.zeros(5_003, dtype=np.float32),  # not None: the subtractions are done
    }[reference]
    params = {"tau": tau, "iterations": steps, "reference": ref}
    want = get_rule("centered-clipping")(vectors, f=1, **params)
    folder = tmp_path / "spool"
    got = aggregate("centered-clipping", _spool(folder, vectors), f=1, chunk=1_000, **params)
    np.testing.assert_array_equal(got, want)
    assert _files(folder) == [".f32"] * 7


def test_the_estimate_between_steps_is_a_scratch_file_beside_the_spool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two files at most, whatever the number of steps (v and v' alternate), in the spool
    folder, and none when there is one step."""
    made: list[Path] = []
    real = Scratch

    def recording(folder: Path, d: int, prefix: str = "geomed-") -> Any:
        s = real(folder, d, prefix)
        made.append(s.path)
        return s

    monkeypatch.setattr(spool_cc, "Scratch", recording)
    folder = tmp_path / "spool"
    maps = _spool(folder, _round(5, 20_000, seed=3))
    aggregate("centered-clipping", maps, f=0, tau=0.5)
    assert made == []
    aggregate("centered-clipping", maps, f=0, tau=0.5, iterations=6)
    assert len(made) == 2
    assert all(p.parent == folder and p.name.startswith("cc-") for p in made)
    assert _files(folder) == [".f32"] * 5


def test_a_failure_between_steps_leaves_no_scratch_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = SpooledStack.norms

    def failing(self: SpooledStack, center: Any = None) -> list[float]:
        calls.append(center)
        if len(calls) == 3:
            raise OSError("disk gone")
        return real(self, center)

    monkeypatch.setattr(SpooledStack, "norms", failing)
    folder = tmp_path / "spool"
    with pytest.raises(OSError, match="disk gone"):
        aggregate("centered-clipping", _spool(folder, _round(5, 20_000, seed=4)), f=0,
                  tau=0.5, iterations=4)
    assert isinstance(calls[1], Scratch)  # step 2 was centered on the file
    assert _files(folder) == [".f32"] * 5


def test_bad_input_gets_the_rules_errors(tmp_path: Path) -> None:
    vectors = _round(5, 9_001, seed=5)
    maps = _spool(tmp_path / "spool", vectors)
    bad_ref = vectors[2].copy()
    bad_ref[7_777] = np.nan
    cases: list[tuple[dict[str, Any], str]] = [
        ({"reference": bad_ref}, r"reference is not finite \(nan at coordinate 7777\)"),
        ({"reference": np.zeros(9_000, dtype=np.float32)}, "reference has length 9000"),
        ({"reference": np.zeros((3, 3_000))}, r"not a flat vector \(shape \(3, 3000\)\)"),
        ({"reference": [0.0] * 9_000}, "reference has length 9000"),
        ({"tau": 0.0}, "tau=0.0 must be finite"),
        ({"iterations": 0}, "iterations=0 must be"),
        ({"f": -1}, "f=-1 is negative"),
    ]
    for params, msg in cases:
        params = {"f": 0, **params}
        with pytest.raises(ValueError, match=msg):
            get_rule("centered-clipping")(vectors, **params)
        with pytest.raises(ValueError, match=msg):
            aggregate("centered-clipping", maps, **params)
    vectors[4][123] = np.inf
    maps = _spool(tmp_path / "inf", vectors)
    for it in (1, 2):
        with pytest.raises(ValueError, match=r"centered-clipping: update 4 is not finite "
                                             r"\(inf at coordinate 123\)"):
            aggregate("centered-clipping", maps, f=0, iterations=it)
    assert _files(tmp_path / "inf") == [".f32"] * 5


def test_the_servers_reduction_clips_around_the_history_reference_from_the_spool(
        tmp_path: Path) -> None:
    """cc_reference 'history': ServerReduction.aggregate passes (1 - mu) * momentum as the
    reference; from the spool, the answer of the same reduction in memory."""
    from collections import Counter
    from types import SimpleNamespace

    from server.config import RunConfig
    from server.reduction import ServerReduction

    vectors = _round(7, 9_001, seed=6)
    red = ServerReduction.__new__(ServerReduction)  # aggregate needs config, counters, run
    red.config = RunConfig(aggregator="centered-clipping", cc_reference="history",
                           aggregator_params={"tau": 0.5, "iterations": 2},
                           byzantine_fraction=0.25, quorum=7)
    red.counters = Counter()
    momentum = np.random.default_rng(1).standard_normal(9_001).astype(np.float32)
    red.run = SimpleNamespace(momentum=momentum)  # type: ignore[assignment]
    want = red.aggregate(vectors, 3)
    assert not np.array_equal(want, get_rule("centered-clipping")(vectors, tau=0.5,
                                                                  iterations=2))
    folder = tmp_path / "spool"
    np.testing.assert_array_equal(red.aggregate(_spool(folder, vectors), 3), want)
    assert _files(folder) == [".f32"] * 7
