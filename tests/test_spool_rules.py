"""server.spool_rules: every rule over spooled updates gives the in-memory rule's answer bit
for bit, reads the spool files (never their mappings), and needs memory that does not grow
with the number of updates; the weighted mean by column blocks."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.spool import Spool, read_block
from server.spool_rules import SpooledRow, aggregate, spooled_stack, weighted_mean
from shared.aggregation import RULES, _stack, estimate_f, get_rule

D = 5_003  # a prime: no block or chunk size divides it


def _round(n: int, seed: int, *, d: int = D) -> list[np.ndarray]:
    """n float32 updates, NaN-free, with adversarial rows: a huge one, a sign-flipped
    copy of an honest one scaled up, two identical ones (exact ties in every distance), and
    one that sits on the honest mean (the geometric median lands near it)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(d).astype(np.float32)
    rows = [base + rng.standard_normal(d).astype(np.float32) * np.float32(0.1)
            for _ in range(n)]
    rows[0] = rng.standard_normal(d).astype(np.float32) * np.float32(1e4)
    if n > 2:
        rows[1] = -rows[2] * np.float32(3.0)
    if n > 4:
        rows[4] = rows[3].copy()
    if n > 5:
        rows[5] = np.mean(np.stack(rows[3:]), axis=0).astype(np.float32)
    return rows


def _spool(tmp_path: Path, vectors: list[np.ndarray]) -> list[np.ndarray]:
    spool = Spool(tmp_path / "spool")
    return [spool.store_vector(f"{i:064x}", 7, v) for i, v in enumerate(vectors)]


class Trap(np.memmap):
    """A spooled vector whose mapping must not be read: slicing it fails the test."""

    def __getitem__(self, key: Any) -> Any:
        raise AssertionError("a spooled update was read through its mapping")


@pytest.fixture(params=[1, 2, 3], ids=lambda b: f"{b}blocks")
def blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The rules' column blocks cut D into 1, 2 or 3 blocks (the last one shorter)."""
    width = -(-D // request.param) + 1  # never a divisor of D
    monkeypatch.setattr(_stack, "_BLOCK_VALUES", 1)
    monkeypatch.setattr(_stack, "_MIN_WIDTH", width)
    return int(request.param)


CASES: list[tuple[str, dict[str, Any]]] = [  # (rule, params)
    ("mean", {}), ("median", {}), ("trimmed-mean", {}), ("krum", {}), ("multi-krum", {}),
    ("multi-krum", {"m": 2}), ("bulyan", {}), ("geometric-median", {}),
    ("geometric-median", {"max_iter": 3}), ("centered-clipping", {"tau": 0.5}),
    ("centered-clipping", {"tau": 2.0, "iterations": 3, "reference": "ref"}),
    ("centered-clipping", {"tau": 0.5, "iterations": 2}),  # one scratch file, from zero
]


@pytest.mark.parametrize(("rule", "params"), CASES,
                         ids=[f"{r}-{'-'.join(p) or 'default'}" for r, p in CASES])
@pytest.mark.parametrize("n", [3, 7, 11])
@pytest.mark.parametrize("chunk", [1_000, 4_096, None])
def test_every_rule_from_the_spool_equals_the_rule_in_memory(
        tmp_path: Path, blocks: int, rule: str, params: dict[str, Any], n: int,
        chunk: int | None) -> None:
    assert set(RULES) == {r for r, _ in CASES}
    vectors = _round(n, seed=n * 31 + blocks)
    if params.get("reference") == "ref":
        params = dict(params, reference=vectors[2] * np.float32(0.5))
    f = estimate_f(n, 0.25, rule=rule)  # as ServerReduction sets it (byzantine_fraction)
    want = np.asarray(get_rule(rule)(vectors, f=f, **params), dtype=np.float32)
    maps = [m.view(Trap) for m in _spool(tmp_path, vectors)]
    got = aggregate(rule, maps, f=f, chunk=chunk, **params)
    assert got.dtype == np.float32
    assert got.shape == (D,)
    np.testing.assert_array_equal(got, want)  # bit for bit
    mixed = [maps[0], *vectors[1:]]  # an update that came in one frame, beside spooled ones
    np.testing.assert_array_equal(aggregate(rule, mixed, f=f, chunk=chunk, **params), want)


def test_the_geometric_medians_explicit_steps_run_from_the_spool_too(tmp_path: Path) -> None:
    """Most updates equal: the Gram iteration's cancellation guard hands over to explicit
    Weiszfeld steps (distances from the estimate by block, then the weighted sum)."""
    rng = np.random.default_rng(5)
    same = rng.standard_normal(D).astype(np.float32)
    vectors = [same.copy() for _ in range(5)] + [
        same + rng.standard_normal(D).astype(np.float32) for _ in range(2)]
    want = get_rule("geometric-median")(vectors)
    got = aggregate("geometric-median", [m.view(Trap) for m in _spool(tmp_path, vectors)],
                    f=0, chunk=999)
    np.testing.assert_array_equal(got, want)


def test_rows_read_their_files_a_chunk_at_a_time(tmp_path: Path) -> None:
    vectors = _round(4, seed=1)
    stack = spooled_stack("krum", _spool(tmp_path, vectors), chunk=2_000)
    row = stack.rows[1]
    assert isinstance(row, SpooledRow)
    assert row.on_disk
    assert len(row) == D
    np.testing.assert_array_equal(row[10:1_500], vectors[1][10:1_500])
    np.testing.assert_array_equal(row[1_500:2_010], vectors[1][1_500:2_010])  # held: [10, 2010)
    assert row.reads == 1
    np.testing.assert_array_equal(row[1_500:2_011], vectors[1][1_500:2_011])  # one more read
    np.testing.assert_array_equal(row[4_990:D + 9], vectors[1][4_990:])
    assert row.reads == 3
    with pytest.raises(ValueError, match="contiguous"):
        row[0:10:2]
    with pytest.raises(TypeError, match="ranges"):
        row[3]  # type: ignore[index]
    np.testing.assert_array_equal(stack.row_vector(1), vectors[1])
    assert stack.lex_cmp(0, 0) == 0
    assert stack.lex_cmp(1, 2) == -stack.lex_cmp(2, 1) != 0


def test_a_bad_spooled_round_is_refused_with_the_rules_error(tmp_path: Path) -> None:
    vectors = _round(7, seed=2)
    vectors[3][4_321] = np.inf  # the spool takes decoded vectors; a rule still names it
    maps = _spool(tmp_path, vectors)
    with pytest.raises(ValueError, match=r"krum: update 3 is not finite \(inf at coordinate "
                                         r"4321\)"):
        aggregate("krum", maps, f=1, chunk=1_000)
    with pytest.raises(ValueError, match="bulyan: f=2 needs n >= 4f \\+ 3"):
        aggregate("bulyan", _spool(tmp_path / "b", _round(7, seed=3)), f=2)
    with pytest.raises(ValueError, match="has length"):
        spooled_stack("krum", [maps[0], np.zeros(3, dtype=np.float32)])
    with pytest.raises(ValueError, match="float32"):
        spooled_stack("krum", [maps[0], np.zeros(D)])


def _peak_mb(fn: Any) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("rule", ["krum", "multi-krum", "bulyan", "geometric-median",
                                  "centered-clipping"])
def test_memory_does_not_grow_with_the_number_of_updates(tmp_path: Path, rule: str) -> None:
    """n x d of updates on disk; the rule's own allocations (numpy's are traced) stay near
    n x chunk + its float64 blocks + a few vectors of d, for 6 or 24 updates alike."""
    d = 300_000  # 1.2 MB an update: 28.8 MB for 24
    peaks = {}
    for n in (6, 24):
        rng = np.random.default_rng(n)
        vectors = [rng.standard_normal(d).astype(np.float32) for _ in range(n)]
        maps = _spool(tmp_path / str(n), vectors)
        del vectors
        f = estimate_f(n, 0.2, rule=rule)
        chunk = 64 * 2**10 // n  # 64 KiB of read-ahead for all rows together
        peaks[n] = _peak_mb(lambda maps=maps, f=f, chunk=chunk: aggregate(
            rule, maps, f=f, chunk=chunk))
    vec_mb = 8 * d / 2**20  # one float64 vector of the model's size
    assert peaks[24] < 4.5 + 4 * vec_mb, peaks  # 4 MiB of float64 blocks + the vectors
    if rule in ("geometric-median", "centered-clipping"):  # their vectors on disk
        assert peaks[24] < 4.5 + vec_mb / 2 + 2.0, peaks  # blocks + the float32 result
    assert peaks[24] - peaks[6] < 1.0, peaks  # not ~21 MB more for 18 more updates


def test_weighted_mean_by_blocks_spooled_or_not(tmp_path: Path) -> None:
    vectors = _round(9, seed=4, d=70_001)
    weights = [3.0, 0.0, 1.5, 2.0, 7.25, 1.0, 0.5, 4.0, 2.0]
    want = np.average(np.stack(vectors).astype(np.float64), axis=0, weights=weights)
    got = weighted_mean(vectors, weights)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6, atol=1e-6)
    spooled = weighted_mean(_spool(tmp_path, vectors), np.array(weights))
    np.testing.assert_array_equal(spooled, got)  # same bits from the files
    for col in (0, 12_345, 70_000):  # each coordinate's own column, summed row after row
        acc = 0.0
        for w, v in zip(weights, vectors, strict=True):
            acc += w * float(v[col])
        assert got[col] == np.float32(acc / sum(weights))
    for bad, msg in (([1.0] * 8, "9 updates"), ([0.0] * 9, "sum to 0"),
                     ([1.0] * 8 + [-1.0], ">= 0"), ([1.0] * 8 + [np.nan], "finite")):
        with pytest.raises(ValueError, match=msg):
            weighted_mean(vectors, bad)


def test_read_block_reads_the_file_not_the_mapping(tmp_path: Path) -> None:
    maps = _spool(tmp_path, _round(3, seed=6))
    got = read_block(maps[1].view(Trap), 100, 200)
    assert not isinstance(got, np.memmap)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.fromfile(tmp_path / "spool" / f"{1:064x}-7.f32",
                                                  dtype="<f4")[100:200])


@pytest.mark.parametrize("rule", ["krum", "multi-krum", "bulyan", "geometric-median",
                                  "centered-clipping", "median"])
def test_the_servers_reduction_takes_every_rule_from_the_spool(tmp_path: Path,
                                                              rule: str) -> None:
    """ServerReduction.aggregate (the run's f, params and rule) on spooled updates: the
    answer of the same reduction on the updates in memory, and no mapping read."""
    from collections import Counter

    from server.config import RunConfig
    from server.reduction import ServerReduction

    red = ServerReduction.__new__(ServerReduction)  # aggregate needs config and counters
    red.config = RunConfig(aggregator=rule, byzantine_fraction=0.25, quorum=7)
    red.counters = Counter()
    vectors = _round(7, seed=8)
    want = red.aggregate(vectors, 3)
    maps: list[np.ndarray] = [m.view(Trap) for m in _spool(tmp_path, vectors)]
    np.testing.assert_array_equal(red.aggregate(maps, 3), want)
