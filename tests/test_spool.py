"""server.spool: spooled vectors and blockwise coordinate-wise aggregation from memmaps give
exactly today's in-memory answer; the spool's files go when cleared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.spool import COORDINATE_RULES, Spool, block_values, blockwise, spooled
from shared.aggregation import get_rule


@pytest.mark.parametrize("rule", sorted(COORDINATE_RULES))
@pytest.mark.parametrize("n", [1, 4, 7])
def test_blockwise_from_memmaps_equals_the_in_memory_rule(tmp_path: Path, rule: str,
                                                          n: int) -> None:
    rng = np.random.default_rng(n)
    d = 10_007  # not a multiple of any block
    vectors = [rng.standard_normal(d).astype(np.float32) * (i + 1) for i in range(n)]
    vectors[0][5] = 1e30 if n > 1 else vectors[0][5]  # an outlier the robust rules ignore
    f = 0 if rule == "mean" or n < 3 else 1
    want = np.asarray(get_rule(rule)(vectors, f=f), dtype=np.float32)
    spool = Spool(tmp_path / "spool")
    maps = [spool.store_vector(f"{i:064x}", 3, v) for i, v in enumerate(vectors)]
    assert spooled(maps)
    assert not spooled(vectors)
    assert all(isinstance(m, np.memmap) for m in maps)
    for block in (1024, 3000, d):
        got = blockwise(get_rule(rule), maps, f=f, block=block)
        np.testing.assert_array_equal(got, want)  # bit for bit
    assert len(spool.files()) == n
    assert spool.clear() == n
    assert spool.files() == []


def test_block_size_bounds_the_bytes_read_whatever_the_count() -> None:
    for n in (1, 10, 100, 1000):
        assert block_values(n, budget=64 * 2**20) * 4 * n <= 64 * 2**20 or \
            block_values(n, budget=64 * 2**20) == 1024
    assert block_values(10_000, budget=1 << 20) == 1024  # the floor


def test_a_new_spool_drops_a_crashed_servers_files(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    root.mkdir()
    (root / "old.part").write_bytes(b"x" * 10)
    spool = Spool(root)
    assert spool.files() == []
    keep = spool.part_path("ab" * 32, 1, "cd" * 32)
    keep.write_bytes(b"y")
    (root / "other.f32").write_bytes(b"z")
    assert spool.clear(keep=lambda p: p == keep) == 1
    assert spool.files() == [keep]
