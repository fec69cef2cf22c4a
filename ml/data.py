"""Datasets, shards and exact entropy floors (numpy only).

Language-model windows: a window ``w`` has ``T + 1`` symbols, ``x = w[:-1]`` and
``y = w[1:]``, so position ``t`` predicts ``w[t + 1]`` from ``w[0..t]``.  For a Markov source
the best achievable mean loss over a window is therefore the average of the conditional
entropies ``H(X_j | X_<j)`` for ``j = 1..T`` (see :meth:`MarkovSource.window_floor`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

log = logging.getLogger("ml.data")

__all__ = [
    "BatchSampler",
    "DataSpec",
    "Dataset",
    "MarkovSource",
    "assign_shards",
    "load_dataset",
    "markov_symbols",
    "shard_indices",
]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
_KINDS = ("markov", "text", "digits")
_PARTITIONS = ("iid", "noniid")
_DENSE_LIMIT = 2048  # solve for the stationary distribution densely up to this many contexts


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``low <= value`` (``< high``) is an int."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and isinstance(value, int) and value >= high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name}: must be an int {bound}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """What data to load; JSON-able via :meth:`to_dict` / :meth:`from_dict`."""

    kind: str
    seed: int = 0
    vocab_size: int = 32
    order: int = 2
    concentration: float = 0.1
    backoff: float = 0.1
    context: int = 64
    n_train: int = 16384
    n_val: int = 256
    path: str | None = None
    sha256: str | None = None
    val_fraction: float = 0.1
    partition: str = "iid"
    alpha: float = 0.5
    # ml/tokenizer.py: "" (the data's symbols), "byte" or "bpe:N"; a BPE tokenizer's JSON
    # (zlib + base64) and its SHA-256 once trained at run creation
    tokenizer: str = ""
    tokenizer_sha256: str | None = None
    tokenizer_blob: str | None = None
    tokenizer_ids: str | None = None  # digest of the token windows, checked where tokenized

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind: must be one of {_KINDS}, got {self.kind!r}")
        if self.partition not in _PARTITIONS:
            raise ValueError(f"partition: must be one of {_PARTITIONS}, got {self.partition!r}")
        lows = {"vocab_size": 2, "order": 1, "context": 1, "seed": 0, "n_train": 1, "n_val": 1}
        for key, low in lows.items():
            _check_int(key, getattr(self, key), low)
        for key in ("concentration", "alpha"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: must be > 0, got {getattr(self, key)!r}")
        if not self.backoff >= 0:
            raise ValueError(f"backoff: must be >= 0, got {self.backoff!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in (0, 1), got {self.val_fraction!r}")
        if self.kind == "text" and not self.path:
            raise ValueError("path: required for kind 'text'")
        from ml.tokenizer import parse_tokenizer

        parse_tokenizer(self.tokenizer)

    def to_dict(self) -> dict[str, object]:
        """All fields as a JSON-able dict (the tokenizer's only when set: older specs keep
        their form and cache keys)."""
        d = dataclasses.asdict(self)
        if not self.tokenizer:
            for key in ("tokenizer", "tokenizer_sha256", "tokenizer_blob", "tokenizer_ids"):
                d.pop(key)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> DataSpec:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DataSpec: unknown keys {unknown}")
        return cls(**d)  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train/val arrays plus the keys used for non-iid sharding and entropy facts."""

    x_train: npt.NDArray[np.generic]
    y_train: IntArray
    x_val: npt.NDArray[np.generic]
    y_val: IntArray
    keys_train: IntArray
    vocab: list[str] | None = None
    entropy_floor: float | None = None
    entropy_rate: float | None = None
    # UTF-8 bytes (Markov: symbols) per predicted token of the val split: loss per byte =
    # loss per token / this, comparable across tokenizers (ml/tokenizer.py)
    bytes_per_token: float | None = None

    @property
    def task(self) -> str:
        """``"lm"`` for token windows, ``"classify"`` for digits."""
        return "lm" if self.y_train.ndim == 2 else "classify"


def markov_symbols(n: int) -> list[str]:
    """``n`` distinct printable one-character symbols ("abc…ABC…012…", then CJK)."""
    base = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    return [base[i] if i < len(base) else chr(0x4E00 + i - len(base)) for i in range(n)]


def _entropy(p: FloatArray) -> float:
    """Shannon entropy in nats, with 0 log 0 = 0."""
    q = p[p > 0]
    return float(-(q * np.log(q)).sum())


class MarkovSource:
    """Order-k Markov source over V symbols.

    Contexts are the last k symbols encoded big-endian in base V (oldest symbol most
    significant), so appending symbol ``a`` to context ``s`` gives ``(s * V + a) % V**k``.
    """

    def __init__(self, transition: npt.ArrayLike, order: int) -> None:
        p = np.asarray(transition, dtype=np.float64)
        if order < 1:
            raise ValueError(f"order: must be >= 1, got {order}")
        if p.ndim != 2 or p.shape[0] != p.shape[1] ** order:
            raise ValueError(f"transition: expected shape [V**order, V], got {p.shape}")
        if np.any(p < 0) or not np.allclose(p.sum(1), 1.0, atol=1e-9):
            raise ValueError("transition: rows must be probability distributions")
        self.transition: FloatArray = p / p.sum(1, keepdims=True)
        self.order = order
        self.vocab_size = p.shape[1]
        self.n_contexts = p.shape[0]
        ctx = np.arange(self.n_contexts, dtype=np.int64)[:, None] * self.vocab_size
        self.next_context: IntArray = (ctx + np.arange(self.vocab_size)) % self.n_contexts
        self.stationary: FloatArray = self._stationary()
        row_h = np.array([_entropy(row) for row in self.transition])
        self.entropy_rate = float(self.stationary @ row_h)

    @classmethod
    def random(cls, vocab_size: int, order: int, concentration: float, seed: int,
               backoff: float = 0.0) -> MarkovSource:
        """Next-symbol laws from default_rng(seed).

        backoff == 0: every context's law ~ Dirichlet(concentration), independently.
        backoff > 0 (hierarchical): order-1 laws P1(.|a) ~ Dirichlet(concentration), and a
        longer context's law ~ Dirichlet(backoff * V * P1(.|last symbol)): centred on the
        bigram, so a model first learns the bigram fast, then the longer context on top.
        """
        rng = np.random.default_rng(seed)
        alpha = np.full(vocab_size, float(concentration))
        if backoff <= 0 or order == 1:
            return cls(rng.dirichlet(alpha, size=vocab_size**order), order)
        base = rng.dirichlet(alpha, size=vocab_size)
        base = (base + 1e-6) / (base + 1e-6).sum(1, keepdims=True)
        last = np.arange(vocab_size**order) % vocab_size
        rows = np.stack([rng.dirichlet(backoff * vocab_size * base[a]) for a in last])
        return cls(rows, order)

    def _step(self, pi: FloatArray) -> FloatArray:
        flow = pi[:, None] * self.transition
        nxt = np.bincount(self.next_context.ravel(), flow.ravel(), minlength=self.n_contexts)
        return nxt.astype(np.float64)

    def _stationary(self) -> FloatArray:
        """Solve ``pi M = pi`` densely; fall back to lazy power iteration (any finite chain)."""
        s = self.n_contexts
        if s <= _DENSE_LIMIT:
            a = np.zeros((s, s))  # a[s', s] = P(s -> s'), then (M^T - I) with a sum-to-1 row
            rows = np.repeat(np.arange(s), self.vocab_size)
            np.add.at(a, (self.next_context.ravel(), rows), self.transition.ravel())
            a -= np.eye(s)
            a[-1, :] = 1.0
            with contextlib.suppress(np.linalg.LinAlgError):
                pi = np.clip(np.linalg.solve(a, np.eye(s)[-1]), 0.0, None)
                if np.isfinite(pi).all() and np.abs(self._step(pi) - pi).sum() < 1e-12:
                    return np.asarray(pi / pi.sum(), dtype=np.float64)
        pi = np.full(s, 1.0 / s)
        for _ in range(1_000_000):
            new = 0.5 * (pi + self._step(pi))
            if np.abs(new - pi).sum() < 1e-13:
                return np.asarray(new / new.sum(), dtype=np.float64)
            pi = new
        raise RuntimeError("stationary distribution did not converge")

    def prefix_entropy(self, m: int) -> float:
        """Joint entropy H(X_0..X_{m-1}) of the first m <= k symbols of a stationary window."""
        if not 0 <= m <= self.order:
            raise ValueError(f"m: must be in [0, {self.order}], got {m}")
        if m == 0:
            return 0.0
        div = self.vocab_size ** (self.order - m)
        idx = np.arange(self.n_contexts) // div
        return _entropy(np.bincount(idx, self.stationary).astype(np.float64))

    def conditional_entropy(self, j: int) -> float:
        """H(X_j | X_<j) for a window whose first k symbols are stationary."""
        if j < 0:
            raise ValueError(f"j: must be >= 0, got {j}")
        if j >= self.order:
            return self.entropy_rate
        return self.prefix_entropy(j + 1) - self.prefix_entropy(j)

    def window_floor(self, context: int) -> float:
        """Minimal mean loss over the T = context predicted positions j = 1..T.

        Equals ``(H(X_0..X_m) - H(X_0) + max(0, T - k + 1) * H) / T`` with
        ``m = min(T, k - 1)``: the prefix terms telescope.
        """
        if context < 1:
            raise ValueError(f"context: must be >= 1, got {context}")
        return float(np.mean([self.conditional_entropy(j) for j in range(1, context + 1)]))

    def sample(self, n: int, length: int, rng: np.random.Generator) -> IntArray:
        """``n`` independent windows of ``length`` symbols, each starting stationary."""
        k, v = self.order, self.vocab_size
        out = np.empty((n, length), dtype=np.int64)
        ctx = np.searchsorted(np.cumsum(self.stationary), rng.random(n) * self.stationary.sum())
        ctx = np.minimum(ctx, self.n_contexts - 1).astype(np.int64)
        for i in range(min(k, length)):
            out[:, i] = (ctx // v ** (k - 1 - i)) % v
        cdf = np.cumsum(self.transition, axis=1)
        for t in range(k, length):
            u = rng.random(n) * cdf[ctx, -1]
            sym = np.minimum((u[:, None] >= cdf[ctx]).sum(1), v - 1)
            out[:, t] = sym
            ctx = (ctx * v + sym) % self.n_contexts
        return out


def _lm_dataset(
    train: IntArray, val: IntArray, vocab: list[str], floor: float | None, rate: float | None,
    bytes_per_token: float | None = None,
) -> Dataset:
    """Windows [N, T+1] -> x = w[:, :-1], y = w[:, 1:]; keys = first token."""
    x_tr, y_tr = np.ascontiguousarray(train[:, :-1]), np.ascontiguousarray(train[:, 1:])
    x_va, y_va = np.ascontiguousarray(val[:, :-1]), np.ascontiguousarray(val[:, 1:])
    return Dataset(x_tr, y_tr, x_va, y_va, x_tr[:, 0].copy(), vocab, floor, rate,
                   bytes_per_token)


def _load_markov(spec: DataSpec) -> Dataset:
    src = MarkovSource.random(spec.vocab_size, spec.order, spec.concentration, spec.seed,
                               backoff=spec.backoff)
    length = spec.context + 1
    # Independent streams of the same source: (seed, 1) for train, (seed, 2) for val.
    train = src.sample(spec.n_train, length, np.random.default_rng((spec.seed, 1)))
    val = src.sample(spec.n_val, length, np.random.default_rng((spec.seed, 2)))
    floor, rate = src.window_floor(spec.context), src.entropy_rate
    return _lm_dataset(train, val, markov_symbols(spec.vocab_size), floor, rate, 1.0)


def _text_split(n_chars: int, val_fraction: float, t: int) -> int | None:
    """Train/val split point, or None if either side is shorter than one window."""
    split = n_chars - round(n_chars * val_fraction)
    return split if min(split, n_chars - split) >= t + 1 else None


def _read_text(spec: DataSpec) -> str:
    assert spec.path is not None
    raw = Path(spec.path).read_bytes()
    if spec.sha256 is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != spec.sha256.lower():
            raise ValueError(f"sha256: expected {spec.sha256}, got {got} for {spec.path}")
    return raw.decode("utf-8")


def _load_text(spec: DataSpec) -> Dataset:
    text = _read_text(spec)
    t, n = spec.context, len(text)
    split = _text_split(n, spec.val_fraction, t)
    if split is None:
        need = 2 * (t + 1)
        while _text_split(need, spec.val_fraction, t) is None:
            need += 1
        raise ValueError(
            f"path: text has {n} characters; need at least {need} for context {t} "
            f"and val_fraction {spec.val_fraction}"
        )
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = np.fromiter((lookup[c] for c in text), dtype=np.int64, count=n)
    train, val = (sliding_window_view(part, t + 1)[::t] for part in (ids[:split], ids[split:]))
    per_char = np.array([len(c.encode("utf-8")) for c in vocab], dtype=np.float64)
    return _lm_dataset(train, val, vocab, None, None, float(per_char[val[:, 1:]].mean()))


def _load_digits(spec: DataSpec) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(spec.seed)
    val_parts: list[IntArray] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = min(max(1, round(len(idx) * spec.val_fraction)), len(idx) - 1)
        val_parts.append(idx[:n_val])
    val_idx = np.sort(np.concatenate(val_parts))
    train_idx = np.setdiff1d(np.arange(len(y)), val_idx)
    return Dataset(x[train_idx], y[train_idx], x[val_idx], y[val_idx], y[train_idx].copy())


def load_dataset(spec: DataSpec) -> Dataset:
    """Load (or generate) the dataset described by ``spec``."""
    if spec.tokenizer:  # "byte" or "bpe:N" (ml/tokenizer.py)
        from ml.tokenizer import load_tokenized

        return load_tokenized(spec)
    if spec.kind == "markov":
        return _load_markov(spec)
    if spec.kind == "text":
        return _load_text(spec)
    return _load_digits(spec)


def _check_shard_args(
    keys: npt.ArrayLike, n_shards: int, shard: int, partition: str, alpha: float
) -> IntArray:
    arr = np.asarray(keys)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"keys: expected a 1-D integer array, got {arr.dtype} {arr.shape}")
    _check_int("n_shards", n_shards, 1)
    _check_int("shard", shard, 0, n_shards)
    if partition not in _PARTITIONS:
        raise ValueError(f"partition: must be one of {_PARTITIONS}, got {partition!r}")
    if not alpha > 0:
        raise ValueError(f"alpha: must be > 0, got {alpha!r}")
    return arr.astype(np.int64)


def assign_shards(
    keys: npt.ArrayLike, *, n_shards: int, partition: str, alpha: float, seed: int
) -> IntArray:
    """Owner shard of every index (int64 [N]); see :func:`shard_indices`."""
    k = _check_shard_args(keys, n_shards, 0, partition, alpha)
    n = len(k)
    rng = np.random.default_rng(seed)
    owner = np.empty(n, dtype=np.int64)
    if partition == "iid":
        for s, part in enumerate(np.array_split(rng.permutation(n), n_shards)):
            owner[part] = s
    else:
        for key in np.unique(k):
            idx = rng.permutation(np.flatnonzero(k == key))
            props = rng.dirichlet(np.full(n_shards, float(alpha)))
            cuts = np.floor(np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for s, part in enumerate(np.split(idx, cuts)):
                owner[part] = s
    if n >= n_shards:  # deterministic fix-up: give each empty shard one item of the largest
        counts = np.bincount(owner, minlength=n_shards)
        for s in range(n_shards):
            if counts[s] == 0:
                donor = int(np.argmax(counts))
                item = int(np.flatnonzero(owner == donor)[-1])
                owner[item] = s
                counts[donor] -= 1
                counts[s] += 1
    return owner


def shard_indices(
    keys: npt.ArrayLike, *, n_shards: int, shard: int, partition: str, alpha: float, seed: int
) -> IntArray:
    """Sorted int64 indices of one shard.

    ``iid``: a seeded random permutation split into ``n_shards`` near-equal parts.
    ``noniid``: per key, Dirichlet(alpha) proportions over shards (label skew).  Shards
    are disjoint, cover ``range(N)`` and are non-empty when ``N >= n_shards``.
    """
    _check_shard_args(keys, n_shards, shard, partition, alpha)
    owner = assign_shards(keys, n_shards=n_shards, partition=partition, alpha=alpha, seed=seed)
    return np.flatnonzero(owner == shard).astype(np.int64)


class BatchSampler:
    """Seeded random batches from a shard: epoch-wise shuffles, batches may span epochs."""

    def __init__(
        self,
        x: npt.NDArray[np.generic],
        y: npt.NDArray[np.generic],
        indices: npt.ArrayLike | None = None,
        *,
        batch_size: int,
        seed: int = 0,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x, y: lengths differ ({len(x)} vs {len(y)})")
        idx = np.arange(len(x)) if indices is None else np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or len(idx) == 0:
            raise ValueError("indices: must be a non-empty 1-D array")
        _check_int("batch_size", batch_size, 1)
        self.x, self.y, self.indices = x, y, idx.astype(np.int64)
        self.batch_size = batch_size
        self._rng = np.random.default_rng(seed)
        self._queue: IntArray = np.zeros(0, dtype=np.int64)

    def sample(self) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.generic]]:
        """Next batch ``(x, y)`` of exactly ``batch_size`` rows."""
        while len(self._queue) < self.batch_size:
            self._queue = np.concatenate([self._queue, self._rng.permutation(self.indices)])
        take, self._queue = self._queue[: self.batch_size], self._queue[self.batch_size :]
        return self.x[take], self.y[take]

    def __iter__(self) -> Iterator[tuple[npt.NDArray[np.generic], npt.NDArray[np.generic]]]:
        while True:
            yield self.sample()


@functools.cache
def _code_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def cache_key(spec: DataSpec) -> str:
    """File name for `spec`'s dataset: the spec AND this module's source (a change in how data
    is generated never reads an old file)."""
    text = json.dumps(spec.to_dict(), sort_keys=True) + _code_digest()
    return hashlib.sha256(text.encode()).hexdigest()[:32] + ".npz"


def load_dataset_cached(spec: DataSpec, cache_dir: Path | None) -> Dataset:
    """`load_dataset`, kept as an .npz in `cache_dir` (a node's state dir) so that a restarted
    node does not generate it again (0.2 s idle for gpt-tiny's Markov data, about 1 s on a
    loaded machine). An unreadable file is logged, regenerated and replaced (temp + rename)."""
    if cache_dir is None:
        return load_dataset(spec)
    path = cache_dir / cache_key(spec)
    try:
        with np.load(path, allow_pickle=False) as z:
            vocab = [str(s) for s in z["vocab"]] if z["has_vocab"] else None
            ent = [float(x) for x in z["entropy"]]
            return Dataset(x_train=z["x_train"], y_train=z["y_train"], x_val=z["x_val"],
                           y_val=z["y_val"], keys_train=z["keys_train"], vocab=vocab,
                           entropy_floor=None if math.isnan(ent[0]) else ent[0],
                           entropy_rate=None if math.isnan(ent[1]) else ent[1],
                           bytes_per_token=None if math.isnan(ent[2]) else ent[2])
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, IndexError) as exc:
        log.warning("dataset cache %s unreadable (%s); generating it again", path, exc)
    ds = load_dataset(spec)
    with contextlib.suppress(OSError):  # a read-only state dir only costs the speed-up
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as fh:
            np.savez(fh, x_train=ds.x_train, y_train=ds.y_train, x_val=ds.x_val,
                     y_val=ds.y_val, keys_train=ds.keys_train,
                     vocab=np.array(ds.vocab or [], dtype=str),
                     has_vocab=np.array(ds.vocab is not None),
                     entropy=np.array([math.nan if v is None else v
                                       for v in (ds.entropy_floor, ds.entropy_rate,
                                                 ds.bytes_per_token)]))
        os.replace(tmp, path)
    return ds
