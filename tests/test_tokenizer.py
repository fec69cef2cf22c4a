"""Run tokenizers (ml/tokenizer.py): byte-level tokens and a BPE trained at run creation.

BPE training is deterministic for a given text and size (also across thread counts), the
tokenizer is stored with the run and reloaded, it is part of the model id, a node with another
tokenizer is refused, and a real server + native node train a BPE llama for a round."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bench.common import free_port, get_json
from ml.data import DataSpec, MarkovSource, load_dataset, markov_symbols
from ml.tokenizer import (
    Bpe,
    TokenizerMismatch,
    bits_per_byte,
    pack,
    parse_tokenizer,
    prepare_spec,
    train_bpe,
    unpack,
)
from ml.workload import from_spec
from server.browser_data import shard_arrays
from server.config import RunConfig
from server.runstate import open_run
from tests.conftest import Procs, wait_for

ROOT = Path(__file__).resolve().parent.parent
def _small(tokenizer: str = "") -> DataSpec:
    return DataSpec(kind="markov", seed=3, context=16, n_train=512, n_val=64,
                    tokenizer=tokenizer)


def _corpus() -> str:
    """Real English text: this repository's docs."""
    return "\n".join(p.read_text("utf-8") for p in sorted((ROOT / "docs").glob("*.md")))


def test_tokenizer_names_are_checked() -> None:
    assert parse_tokenizer("") == ("", None)
    assert parse_tokenizer("byte") == ("byte", 256)
    assert parse_tokenizer("bpe:512") == ("bpe", 512)
    for bad in ("bpe:256", "bpe:9000", "bpe:", "bpe:x", "wordpiece", None):
        with pytest.raises(ValueError, match="bpe:N"):
            parse_tokenizer(bad)
    with pytest.raises(ValueError, match="config tokenizer must be"):
        RunConfig(tokenizer="bpe:12")
    with pytest.raises(ValueError, match="tokenizer"):
        DataSpec(kind="markov", tokenizer="bpe:12")


def test_bpe_training_is_deterministic_for_a_text_and_size() -> None:
    docs = [_corpus()]
    first = train_bpe(docs, 400, split_words=True)
    assert train_bpe(docs, 400, split_words=True) == first
    # another process on one thread (the trainer is parallel by default) gets the same bytes
    code = ("import sys, hashlib; from ml.tokenizer import train_bpe; "
            "print(hashlib.sha256(train_bpe([sys.stdin.read()], 400, split_words=True)"
            ".encode()).hexdigest())")
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", code], input=docs[0], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=120, check=True)
    assert out.stdout.strip() == pack(first)[0]
    assert pack(train_bpe(docs, 401, split_words=True))[0] != pack(first)[0]
    bpe = Bpe(first)
    assert bpe.vocab_size == 400
    ids = bpe.encode(docs)[0]
    assert bpe.tok.decode(ids.tolist()) == docs[0]  # byte-level: lossless
    assert len(ids) < 0.7 * len(docs[0].encode())  # merges compress English text


def test_blob_is_checked_against_its_hash() -> None:
    text = train_bpe(["abcabcabd" * 50], 260, split_words=False)
    sha, blob = pack(text)
    assert unpack(blob, sha) == text
    other_sha, other_blob = pack(text + " ")  # another tokenizer.json
    with pytest.raises(TokenizerMismatch, match="tokenizer mismatch"):
        unpack(other_blob, sha)
    with pytest.raises(TokenizerMismatch, match="does not decode"):
        unpack("!!" + blob, sha)
    assert other_sha != sha


def test_byte_tokens_keep_the_synthetic_language_and_its_exact_floor() -> None:
    plain = load_dataset(_small())
    byte = load_dataset(_small("byte"))
    codes = np.array([ord(c) for c in markov_symbols(32)])
    np.testing.assert_array_equal(byte.x_train, codes[plain.x_train])
    np.testing.assert_array_equal(byte.y_val, codes[plain.y_val])
    assert byte.entropy_floor == plain.entropy_floor
    assert byte.bytes_per_token == plain.bytes_per_token == 1.0
    assert byte.vocab is not None
    assert len(byte.vocab) == 256


def test_bpe_on_the_synthetic_language_floors_per_symbol() -> None:
    spec = prepare_spec(_small("bpe:300"))
    assert spec.tokenizer_sha256 == pack(unpack(spec.tokenizer_blob or "", spec.tokenizer_sha256
                                                or ""))[0]
    assert prepare_spec(spec) is spec  # trained once
    ds = load_dataset(spec)
    assert ds.vocab is not None
    assert len(ds.vocab) == 300
    assert ds.x_train.shape[1] == 16
    assert int(ds.x_train.max()) < 300
    # per token the floor is not known in closed form; per symbol the entropy rate is exact
    src = MarkovSource.random(32, 2, 0.1, 3, backoff=0.1)
    assert ds.entropy_floor is None
    assert ds.entropy_rate == pytest.approx(src.entropy_rate, rel=1e-12)
    assert ds.bytes_per_token is not None
    assert 1.5 < ds.bytes_per_token < 16
    # every window decodes to a piece of the source's language
    bpe = Bpe(unpack(spec.tokenizer_blob or "", spec.tokenizer_sha256 or ""))
    row = np.concatenate([ds.x_val[0], ds.y_val[0, -1:]])
    assert set(bpe.tok.decode(row.tolist())) <= set(markov_symbols(32))
    measured = np.mean([len(bpe.vocab[i]) for i in ds.y_val.ravel()])
    assert ds.bytes_per_token == pytest.approx(measured)
    assert bits_per_byte(ds.bytes_per_token * math.log(2), ds.bytes_per_token) == 1.0


def test_bpe_on_a_text_file(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text(_corpus(), "utf-8")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    spec = prepare_spec(DataSpec(kind="text", path=str(path), sha256=sha, context=32,
                                 tokenizer="bpe:600"))
    ds = load_dataset(spec)
    chars = load_dataset(DataSpec(kind="text", path=str(path), sha256=sha, context=32))
    assert ds.bytes_per_token is not None
    assert chars.bytes_per_token is not None
    assert ds.bytes_per_token > 1.5 * chars.bytes_per_token
    assert len(ds.x_val) > 0
    assert len(ds.x_train) < len(chars.x_train)
    # trained on the training part only: the val text is not in the tokenizer's corpus
    text = path.read_text("utf-8")
    split = len(text) - round(len(text) * 0.1)
    again = train_bpe([text[:split]], 600, split_words=True)
    assert pack(again)[0] == spec.tokenizer_sha256


def _overrides(**kw: object) -> dict[str, object]:
    return {"model": "llama", "flavour": "tiny", "tokenizer": "bpe:300", **kw}


def test_tokenizer_is_stored_with_the_run_and_reloaded(tmp_path: Path) -> None:
    run = open_run(tmp_path, _overrides())
    stored = tmp_path / "tokenizer.json"
    sha = hashlib.sha256(stored.read_bytes()).hexdigest()
    assert run.work.model_config["tokenizer"] == sha == run.work.data_spec.tokenizer_sha256
    assert run.work.model_config["vocab_size"] == 300
    assert json.loads(stored.read_text())["model"]["type"] == "BPE"
    payload, meta = shard_arrays(run.work, 0, 8)  # what a tab fetches: token ids + vocab
    assert isinstance(meta["x_bytes"], int)
    assert meta["vocab"] == run.work.dataset.vocab
    ids = np.frombuffer(payload[:meta["x_bytes"]], dtype="<i4")
    assert 256 <= int(ids.max()) < 300  # merged tokens, inside the vocabulary
    again = open_run(tmp_path, {})
    assert again.work.model_id == run.work.model_id
    np.testing.assert_array_equal(again.params, run.params)
    np.testing.assert_array_equal(again.work.dataset.x_train, run.work.dataset.x_train)
    with pytest.raises(ValueError, match="cannot change"):
        open_run(tmp_path, {"tokenizer": "bpe:301"})
    stored.write_text(stored.read_text().replace('"BPE"', '"BPE" ', 1))
    with pytest.raises(TokenizerMismatch, match="not this run's"):
        open_run(tmp_path, {})


def test_the_model_id_depends_on_the_tokenizer_and_another_one_is_refused(
        tmp_path: Path) -> None:
    run = open_run(tmp_path / "a", _overrides())
    other = open_run(tmp_path / "b", _overrides(seed=1))  # other text, other tokenizer
    assert other.work.data_spec.tokenizer_sha256 != run.work.data_spec.tokenizer_sha256
    cfg, spec = run.work.model_config, run.work.data_spec
    assert from_spec(cfg, spec).model_id == run.work.model_id
    # the run's model with another run's tokenizer, as a node would rebuild it
    with pytest.raises(TokenizerMismatch, match="tokenizer mismatch"):
        from_spec(cfg, other.work.data_spec)
    swapped = dataclasses.replace(spec, tokenizer_blob=other.work.data_spec.tokenizer_blob)
    with pytest.raises(TokenizerMismatch, match="tokenizer mismatch"):
        from_spec(cfg, swapped)
    with pytest.raises(TokenizerMismatch, match="tokenizer mismatch"):
        from_spec({k: v for k, v in cfg.items() if k != "tokenizer"}, spec)


def test_a_real_run_trains_a_bpe_llama(procs: Procs, tmp_path: Path) -> None:
    port = free_port()
    procs.server("server", tmp_path / "run", port, "--model", "llama", "--flavour", "tiny",
                 "--tokenizer", "bpe:400", "--inner-steps", "20", "--quorum", "1",
                 "--rounds", "1")
    node = procs.node("n0", port)
    rows = wait_for(lambda: get_json(f"http://127.0.0.1:{port}/api/rounds"), 120,
                    "a committed round")
    run = get_json(f"http://127.0.0.1:{port}/api/run")
    assert isinstance(run, dict)
    assert isinstance(rows, list)
    stored = (tmp_path / "run" / "tokenizer.json").read_bytes()
    assert run["model"]["tokenizer"] == hashlib.sha256(stored).hexdigest()
    url = f"http://127.0.0.1:{port}/api/tokenizer.json"
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == stored
        assert resp.headers["X-Tokenizer-Sha256"] == run["model"]["tokenizer"]
    assert run["model"]["vocab_size"] == 400
    assert "tokenizer_blob" not in run["data"]
    assert run["entropy_floor"] is None
    assert run["bytes_per_token"] > 1.5
    assert rows[0]["n_updates"] == 1
    assert rows[0]["eval_loss"] < run["eval_loss_init"], (rows, run["eval_loss_init"])
    assert node.wait(60) == 0


def test_a_text_run_is_rebuilt_by_a_node_from_its_own_copy(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text(_corpus(), "utf-8")
    run = open_run(tmp_path / "run", _overrides(data="text", data_path=str(path),
                                                tokenizer="bpe:400"))
    assert run.work.model_config["vocab_size"] == 400
    copy = tmp_path / "node" / "corpus.txt"  # the node's copy, elsewhere
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    node = from_spec(run.work.model_config, run.work.data_spec, local_path=str(copy))
    assert node.model_id == run.work.model_id
    np.testing.assert_array_equal(node.dataset.x_train, run.work.dataset.x_train)
    copy.write_text(_corpus() + "one more line\n", "utf-8")  # another text: refused
    with pytest.raises(ValueError, match="sha256"):
        from_spec(run.work.model_config, run.work.data_spec, local_path=str(copy))


def test_a_node_whose_tokenizers_encodes_differently_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = open_run(tmp_path, _overrides())
    cfg, spec = run.work.model_config, run.work.data_spec
    assert spec.tokenizer_ids is not None
    honest = Bpe.encode

    def drifted(self: Bpe, docs: list[str]) -> list[np.ndarray]:
        """Another tokenizers release: same tokenizer.json, one token split differently."""
        out = honest(self, docs)
        out[0] = np.concatenate([out[0][:5], out[0][6:]])
        return out

    monkeypatch.setattr(Bpe, "encode", drifted)
    with pytest.raises(TokenizerMismatch, match="encodes the run's text differently"):
        from_spec(cfg, spec)


def test_a_tokenizer_too_large_for_the_welcome_is_refused_at_creation(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ml.tokenizer.MAX_BLOB", 1000)
    with pytest.raises(ValueError, match="over the 1000 the Welcome carries"):
        prepare_spec(_small("bpe:300"))
    with pytest.raises(ValueError, match="one byte per symbol up to 94"):
        load_dataset(DataSpec(kind="markov", vocab_size=100, n_train=8, n_val=8,
                              tokenizer="byte"))
