"""Chunked encoding (shared.chunk_encode) is bit-identical to the one-shot path
(shared.update_encoding): the same payload bytes, digest and new residual, for every codec
that takes it, with and without error feedback, over two rounds."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared import chunk_encode
from shared.chunk_encode import FileSpool, all_finite, digests, encode_chunked, refusal
from shared.codecs import make_codec
from shared.stream import manifest
from shared.update_encoding import encode_update

CODECS: list[tuple[str, dict[str, Any]]] = [
    ("raw32", {}), ("fp16", {}), ("bf16", {}),
    ("int8-block", {}), ("int8-block", {"block": 100, "mode": "minmax"}),
    ("int8-block", {"block": 64, "scale_dtype": "fp16"}),
    ("int4-block", {"block": 64}), ("int4-block", {"block": 33, "mode": "minmax"}),
    ("topk", {"fraction": 0.01}), ("topk", {"fraction": 0.05, "values": "int2"}),
    ("topk", {"fraction": 0.02, "values": "fp16"}), ("topk", {"fraction": 1.0}),
]


class ArraySource:
    """Δ from a float32 array, a chunk at a time (what the trainer's source gives)."""

    def __init__(self, delta: np.ndarray) -> None:
        self.delta, self.n, self.reads = delta, delta.size, 0

    def read(self, lo: int, hi: int) -> np.ndarray:
        self.reads += 1
        return self.delta[lo:hi].copy()

    def whole(self) -> np.ndarray:
        return self.delta.copy()


def spool_bytes(spool: FileSpool, size: int) -> bytes:
    return spool.read_at(0, size)


def one_shot(codec: Any, delta: np.ndarray, residual: np.ndarray | None, ef: bool
             ) -> tuple[bytes, Any]:
    res = None if residual is None else residual.copy()
    payload, new, _ = encode_update(codec, delta.copy(), residual=res, state=None,
                                    error_feedback=ef, layout=None, consume=True)
    return payload, new


def chunked(codec: Any, delta: np.ndarray, residual: np.ndarray | None, ef: bool,
            path: Path) -> tuple[bytes, Any, FileSpool, int]:
    spool = FileSpool(str(path))
    res = None if residual is None else residual.copy()
    size, new = encode_chunked(codec, ArraySource(delta), residual=res, error_feedback=ef,
                               spool=spool)
    return spool_bytes(spool, size), new, spool, size


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunk_encode, "COORDS", 1000)  # many chunks for small vectors
    monkeypatch.setattr(chunk_encode, "READ_BYTES", 777)


def same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32)))


@pytest.mark.parametrize(("name", "params"), CODECS)
@pytest.mark.parametrize("ef", [True, False])
def test_two_rounds_are_bit_identical_to_the_one_shot_path(name: str, params: dict[str, Any],
                                                           ef: bool, tmp_path: Path) -> None:
    codec = make_codec(name, **params)
    rng = np.random.default_rng(7)
    n = 10_007  # not a multiple of any block or chunk
    res_a = res_b = None
    for r in range(2):  # round 2 adds the residual of round 1
        delta = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 1, n)).astype(np.float32)
        delta[::97] = delta[5]  # ties for topk
        want, res_a = one_shot(codec, delta, res_a, ef)
        got, res_b, spool, size = chunked(codec, delta, res_b, ef, tmp_path / f"s{r}")
        assert got == want, f"round {r}: payload differs"
        assert size == len(want)
        assert same(res_b, res_a), f"round {r}: residual differs"
        digest, man = digests(spool, size, 1500)
        assert digest == hashlib.sha256(want).hexdigest()
        assert man == manifest(want, 1500)
        spool.remove()
    if name == "raw32" or not ef:
        assert res_a is None  # lossless, or no error feedback: nothing to carry
    else:
        assert res_a is not None


def test_nan_in_delta_is_found_before_anything_is_encoded() -> None:
    delta = np.ones(5000, dtype=np.float32)
    assert all_finite(ArraySource(delta))
    delta[4321] = np.nan
    assert not all_finite(ArraySource(delta))
    delta[4321] = np.inf
    assert not all_finite(ArraySource(delta))


def test_the_source_is_read_a_chunk_at_a_time(tmp_path: Path) -> None:
    src = ArraySource(np.arange(10_000, dtype=np.float32))
    spool = FileSpool(str(tmp_path / "s"))
    encode_chunked(make_codec("fp16"), src, residual=None, error_feedback=True, spool=spool)
    assert src.reads == 10  # 1000 values each
    src.reads = 0
    encode_chunked(make_codec("topk", fraction=0.1), src, residual=None, error_feedback=False,
                   spool=spool)
    assert src.reads == 4 * 10  # two counting passes, the selection, the values


def test_refusal_names_what_keeps_the_one_shot_path() -> None:
    args: dict[str, Any] = {"stream_chunk": 1024, "transport": "ws", "dp": False,
                            "secagg": False, "momentum": 0.0, "spool": True}
    assert refusal(make_codec("int8-block"), **args) is None
    assert refusal(make_codec("powersgd"), **args) == "codec powersgd"
    assert refusal(make_codec("raw32"), **{**args, "stream_chunk": 0}) == \
        "the run does not stream"
    assert refusal(make_codec("raw32"), **{**args, "transport": "star"}) is None
    assert refusal(make_codec("raw32"), **{**args, "transport": "p2p"}) == "transport p2p"
    assert refusal(make_codec("raw32"), **{**args, "dp": True}) == "client DP"
    assert refusal(make_codec("raw32"), **{**args, "momentum": 0.9}) == "worker momentum"
    assert refusal(make_codec("raw32"), **{**args, "spool": False}) == "no spool"
