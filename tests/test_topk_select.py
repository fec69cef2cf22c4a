"""topk's block-wise selection picks exactly the whole-vector answer: the k largest |x|,
ties to the lower index, with ties and kept values spread across block edges."""

from __future__ import annotations

import numpy as np
import pytest

from shared.codecs import topk


def reference(x: np.ndarray, k: int) -> np.ndarray:
    order = np.lexsort((np.arange(x.size), -np.abs(x)))  # |x| descending, index ascending
    return np.sort(order[:k])


@pytest.mark.parametrize("block", [1, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize("seed", range(4))
def test_block_selection_matches_the_whole_vector_rule(monkeypatch: pytest.MonkeyPatch,
                                                       block: int, seed: int) -> None:
    monkeypatch.setattr(topk, "SELECT_BLOCK", block)
    rng = np.random.default_rng(seed)
    x = rng.integers(-4, 5, size=257).astype(np.float32)  # few magnitudes: ties everywhere
    for k in (1, 5, 60, 128, 256):
        got = topk._top_indices(np, x, k, "topk")
        assert np.array_equal(got, reference(x, k)), (block, k)


def test_a_nan_is_refused_before_any_selection() -> None:
    x = np.ones(10, dtype=np.float32)
    x[7] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        topk._top_indices(np, x, 3, "topk")
