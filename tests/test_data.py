"""Tests for ml.data: entropy facts, datasets, shards, batches."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ml.data import (
    BatchSampler,
    DataSpec,
    MarkovSource,
    assign_shards,
    load_dataset,
    shard_indices,
)


def _plugin_entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_uniform_source_entropy_is_log_v() -> None:
    for order in (1, 2):
        v = 5
        src = MarkovSource(np.full((v**order, v), 1.0 / v), order)
        assert src.entropy_rate == pytest.approx(math.log(v), abs=1e-12)
        assert np.allclose(src.stationary, 1.0 / v**order, atol=1e-12)
        for t in (1, 2, 64):
            assert src.window_floor(t) == pytest.approx(math.log(v), abs=1e-12)


def test_deterministic_cycle_has_zero_entropy() -> None:
    # 0 -> 1 -> 2 -> 0: periodic and deterministic; stationary is uniform, H = 0.
    p = np.roll(np.eye(3), 1, axis=1)
    src = MarkovSource(p, 1)
    assert src.entropy_rate == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(src.stationary, 1.0 / 3, atol=1e-12)
    assert src.window_floor(16) == pytest.approx(0.0, abs=1e-12)
    w = src.sample(8, 10, np.random.default_rng(0))
    assert np.all((w[:, 1:] - w[:, :-1]) % 3 == 1)


def test_two_state_chain_closed_form() -> None:
    a, b = 0.2, 0.7
    src = MarkovSource(np.array([[1 - a, a], [b, 1 - b]]), 1)

    def h(q: float) -> float:
        return -(q * math.log(q) + (1 - q) * math.log(1 - q))

    pi0, pi1 = b / (a + b), a / (a + b)
    assert src.stationary == pytest.approx([pi0, pi1], abs=1e-12)
    expected = pi0 * h(a) + pi1 * h(b)
    assert src.entropy_rate == pytest.approx(expected, abs=1e-12)
    assert src.window_floor(7) == pytest.approx(expected, abs=1e-12)


def test_order2_floor_formula() -> None:
    src = MarkovSource.random(6, 2, 0.3, seed=3)
    h1, h2, rate = src.prefix_entropy(1), src.prefix_entropy(2), src.entropy_rate
    assert src.conditional_entropy(1) == pytest.approx(h2 - h1)
    t = 10
    assert src.window_floor(t) == pytest.approx((h2 - h1 + (t - 1) * rate) / t, abs=1e-12)
    assert src.window_floor(1) == pytest.approx(h2 - h1, abs=1e-12)
    # Stationarity: marginal of the last k-1 symbols equals marginal of the first k-1.
    pi = src.stationary.reshape(6, 6)
    assert np.allclose(pi.sum(0), pi.sum(1), atol=1e-12)


def test_empirical_entropy_rate_matches() -> None:
    v, k = 4, 2
    src = MarkovSource.random(v, k, 0.5, seed=1)
    w = src.sample(3000, 41, np.random.default_rng(7))
    ctx = w[:, :-2] * v + w[:, 1:-1]
    joint = np.bincount((ctx * v + w[:, 2:]).ravel(), minlength=v**3).astype(float)
    cond = _plugin_entropy(joint) - _plugin_entropy(joint.reshape(v * v, v).sum(1))
    assert cond == pytest.approx(src.entropy_rate, abs=0.01)


def test_empirical_window_floor_matches() -> None:
    # T = 2: floor = (H(X1|X0) + H(X2|X0,X1)) / 2 = (H(X0,X1,X2) - H(X0)) / 2.
    v = 3
    src = MarkovSource.random(v, 2, 0.5, seed=2)
    w = src.sample(200_000, 3, np.random.default_rng(11))
    joint = np.bincount((w[:, 0] * v + w[:, 1]) * v + w[:, 2], minlength=v**3).astype(float)
    first = np.bincount(w[:, 0], minlength=v).astype(float)
    est = (_plugin_entropy(joint) - _plugin_entropy(first)) / 2
    assert est == pytest.approx(src.window_floor(2), abs=0.01)


def test_markov_dataset_shapes_and_determinism() -> None:
    spec = DataSpec(kind="markov", vocab_size=8, context=16, n_train=128, n_val=32, seed=4)
    ds = load_dataset(spec)
    assert ds.x_train.shape == (128, 16)
    assert ds.y_train.shape == (128, 16)
    assert ds.x_val.shape == (32, 16)
    assert ds.x_train.dtype == np.int64
    assert np.array_equal(ds.x_train[:, 1:], ds.y_train[:, :-1])
    assert np.array_equal(ds.keys_train, ds.x_train[:, 0])
    assert ds.vocab is not None
    assert len(set(ds.vocab)) == 8
    assert ds.task == "lm"
    assert ds.entropy_rate is not None
    assert ds.entropy_floor is not None
    assert 0 < ds.entropy_rate <= ds.entropy_floor <= math.log(8)
    again = load_dataset(spec)
    assert np.array_equal(ds.x_train, again.x_train)
    assert np.array_equal(ds.x_val, again.x_val)
    assert not np.array_equal(ds.x_train[:32], ds.x_val)


def test_default_markov_spec() -> None:
    ds = load_dataset(DataSpec(kind="markov"))
    assert ds.x_train.shape == (16384, 64)
    assert ds.x_val.shape == (256, 64)
    # hierarchical source (backoff 0.1): bigram-centred order-2 laws
    assert ds.entropy_rate == pytest.approx(1.0864855, abs=1e-6)
    assert ds.entropy_floor == pytest.approx(1.0926017, abs=1e-6)


def test_backoff_source_bigram_carries_most_information() -> None:
    src = MarkovSource.random(32, 2, 0.1, 0, backoff=0.1)
    unigram, bigram = src.conditional_entropy(0), src.conditional_entropy(1)
    assert unigram > bigram > src.entropy_rate + 0.2  # order 2 still adds > 0.2 nats
    flat = MarkovSource.random(32, 2, 0.1, 0)
    assert flat.conditional_entropy(1) > 3.0  # independent rows: the bigram tells little


def test_dataspec_round_trip_and_rejections() -> None:
    spec = DataSpec(kind="text", path="/tmp/x.txt", sha256="ab", partition="noniid", alpha=0.3)
    d = json.loads(json.dumps(spec.to_dict()))
    assert DataSpec.from_dict(d) == spec
    with pytest.raises(ValueError, match="bogus"):
        DataSpec.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="kind"):
        DataSpec(kind="images")
    with pytest.raises(ValueError, match="partition"):
        DataSpec(kind="digits", partition="weird")
    with pytest.raises(ValueError, match="path"):
        DataSpec(kind="text")


def test_text_dataset(tmp_path: Path) -> None:
    text = "".join("héllo wörld, " * 40)
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    ds = load_dataset(DataSpec(kind="text", path=str(f), sha256=digest, context=16))
    assert ds.vocab == sorted(set(text))
    n_val = round(len(text) * 0.1)
    assert ds.x_train.shape == ((len(text) - n_val - 1) // 16, 16)
    assert ds.x_val.shape == ((n_val - 1) // 16, 16)
    decoded = "".join(ds.vocab[i] for i in ds.x_train[0]) + ds.vocab[ds.y_train[0, -1]]
    assert decoded == text[:17]
    assert "".join(ds.vocab[i] for i in ds.x_train[1]) == text[16:32]
    assert ds.entropy_floor is None


def test_text_errors(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("abc" * 100, encoding="utf-8")
    bad = "0" * 64
    with pytest.raises(ValueError, match=bad) as err:
        load_dataset(DataSpec(kind="text", path=str(f), sha256=bad, context=8))
    assert bad in str(err.value)
    assert hashlib.sha256(f.read_bytes()).hexdigest() in str(err.value)
    with pytest.raises(ValueError, match="need at least 646"):
        load_dataset(DataSpec(kind="text", path=str(f), context=64))


def test_digits_offline_stratified() -> None:
    ds = load_dataset(DataSpec(kind="digits", seed=0))
    assert ds.x_train.shape[1] == 64
    assert ds.x_train.dtype == np.float32
    assert len(ds.x_train) + len(ds.x_val) == 1797
    assert ds.x_train.min() >= 0.0
    assert ds.x_train.max() <= 1.0
    assert ds.task == "classify"
    assert ds.entropy_floor is None
    assert np.array_equal(ds.keys_train, ds.y_train)
    frac = np.bincount(ds.y_val, minlength=10) / np.bincount(
        np.concatenate([ds.y_train, ds.y_val]), minlength=10
    )
    assert np.all(np.abs(frac - 0.1) < 0.01)
    again = load_dataset(DataSpec(kind="digits", seed=0))
    assert np.array_equal(ds.y_val, again.y_val)


@pytest.mark.parametrize("partition", ["iid", "noniid"])
def test_shards_disjoint_covering_deterministic(partition: str) -> None:
    keys = np.random.default_rng(0).integers(0, 10, size=1000)
    kw = {"n_shards": 7, "partition": partition, "alpha": 0.3, "seed": 5}
    shards = [shard_indices(keys, shard=s, **kw) for s in range(7)]  # type: ignore[arg-type]
    allidx = np.concatenate(shards)
    assert np.array_equal(np.sort(allidx), np.arange(1000))
    assert all(len(s) > 0 and s.dtype == np.int64 for s in shards)
    again = shard_indices(keys, shard=3, **kw)  # type: ignore[arg-type]
    assert np.array_equal(shards[3], again)
    if partition == "iid":
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_noniid_is_skewed() -> None:
    keys = np.repeat(np.arange(10), 100)

    def spread(partition: str) -> float:
        owner = assign_shards(keys, n_shards=5, partition=partition, alpha=0.1, seed=0)
        hist = np.stack([np.bincount(keys[owner == s], minlength=10) for s in range(5)])
        dist = hist / hist.sum(1, keepdims=True)
        return float(np.abs(dist - dist.mean(0)).sum(1).mean())

    assert spread("noniid") > 4 * spread("iid")


def test_shards_nonempty_fixup_and_validation() -> None:
    keys = np.zeros(6, dtype=np.int64)  # one key, tiny alpha: Dirichlet gives one big shard
    shards = [
        shard_indices(keys, n_shards=6, shard=s, partition="noniid", alpha=0.01, seed=0)
        for s in range(6)
    ]
    assert sorted(int(i) for s in shards for i in s) == list(range(6))
    assert all(len(s) == 1 for s in shards)
    for bad, name in (
        ({"n_shards": 0}, "n_shards"),
        ({"shard": 4}, "shard"),
        ({"partition": "x"}, "partition"),
        ({"alpha": 0.0}, "alpha"),
    ):
        kw = {"n_shards": 4, "shard": 0, "partition": "iid", "alpha": 0.5, "seed": 0, **bad}
        with pytest.raises(ValueError, match=name):
            shard_indices(keys, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keys"):
        shard_indices(np.zeros(4), n_shards=2, shard=0, partition="iid", alpha=0.5, seed=0)


def test_batch_sampler() -> None:
    x = np.arange(20).reshape(10, 2)
    y = np.arange(10)
    idx = np.array([1, 3, 5])
    s1 = BatchSampler(x, y, idx, batch_size=4, seed=1)
    s2 = BatchSampler(x, y, idx, batch_size=4, seed=1)
    for _ in range(5):
        (xa, ya), (xb, yb) = s1.sample(), s2.sample()
        assert xa.shape == (4, 2)
        assert np.array_equal(xa, xb)
        assert np.array_equal(ya, yb)
        assert set(ya.tolist()) <= {1, 3, 5}
        assert np.array_equal(xa[:, 0], 2 * ya)
    full = BatchSampler(x, y, batch_size=5, seed=0)
    a, b = full.sample()[1], full.sample()[1]
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(10))  # one epoch


def test_dataset_cache_round_trips_and_survives_a_corrupt_file(tmp_path: Path) -> None:
    from ml.data import cache_key, load_dataset_cached

    for spec in (DataSpec(kind="markov", seed=3, context=16),
                 DataSpec(kind="digits", seed=1)):
        fresh = load_dataset(spec)
        first = load_dataset_cached(spec, tmp_path)
        path = tmp_path / cache_key(spec)
        assert path.exists()
        again = load_dataset_cached(spec, tmp_path)  # from the file this time
        for ds in (first, again):
            for name in ("x_train", "y_train", "x_val", "y_val", "keys_train"):
                np.testing.assert_array_equal(getattr(ds, name), getattr(fresh, name))
                assert getattr(ds, name).dtype == getattr(fresh, name).dtype
            assert (ds.vocab, ds.entropy_floor, ds.entropy_rate) == (
                fresh.vocab, fresh.entropy_floor, fresh.entropy_rate)
        path.write_bytes(b"not an npz")
        healed = load_dataset_cached(spec, tmp_path)
        np.testing.assert_array_equal(healed.x_train, fresh.x_train)
        assert load_dataset_cached(spec, tmp_path).vocab == fresh.vocab  # rewritten
    assert cache_key(DataSpec(kind="markov", seed=3, context=16)) != cache_key(
        DataSpec(kind="markov", seed=4, context=16))
