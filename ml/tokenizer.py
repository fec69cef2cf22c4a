"""How a language-model run turns its text into token ids.

Three tokenizers, named by the run config's ``tokenizer`` (and the data spec's):

* ``""`` (default): the data's own symbols, as before: a Markov source's V symbols, a text
  file's distinct characters.
* ``"byte"``: UTF-8 bytes, vocabulary 256. For the synthetic language (V <= 94 symbols, all
  ASCII) a symbol is one byte, so the windows and the exact entropy floor are the default's.
* ``"bpe:N"``: a byte-level BPE tokenizer with N tokens (256 bytes + N - 256 merges), trained
  by the ``tokenizers`` package at run creation on the run's training text only (a text
  file's training part; for the synthetic language, chains sampled from the source). Training
  is deterministic for a given text and N (tests/test_tokenizer.py). The tokenizer.json rides
  in the data spec (zlib + base64, ``tokenizer_blob``) with its SHA-256, so every node gets it
  in the server's signed Welcome and checks it before it tokenizes anything; the model config
  carries the hash, so it is part of the run's model id, and the spec carries a digest of the
  token windows (``tokenizer_ids``), so a node whose ``tokenizers`` encodes differently is
  refused too. The server also keeps it as
  ``tokenizer.json`` in the run's data directory.

Floors: with BPE the per-token floor of a window is not known in closed form (token
boundaries depend on the data), so ``Dataset.entropy_floor`` is None; ``entropy_rate`` (nats
per symbol, exact for the synthetic language) and ``bytes_per_token`` (UTF-8 bytes, or Markov
symbols, per predicted token of the validation split) stay, and loss per byte =
loss per token / bytes_per_token is what compares runs across tokenizers.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

if TYPE_CHECKING:
    from ml.data import Dataset, DataSpec

__all__ = ["BPE_MAX", "BPE_MIN", "MAX_BLOB", "TOKENIZER_FILE", "Bpe", "TokenizerMismatch",
           "bits_per_byte", "ids_digest", "keep_tokenizer_file", "load_tokenized", "pack",
           "parse_tokenizer", "prepare_spec", "seal_spec", "tokenizer_tag", "train_bpe",
           "unpack"]

BPE_MIN, BPE_MAX = 257, 8192  # 256 byte tokens + at least one merge
# The blob travels in the Welcome's JSON header, which frames cap at 64 KiB (shared/frame.py).
MAX_BLOB = 48 * 1024
MAX_JSON = 8 * 1024 * 1024  # decompression bound for a blob from the wire
ASCII_SYMBOLS = 94  # markov_symbols(n) is ASCII (one byte per symbol) up to here
INSTALL_HINT = "pip install 'daa-prime[bpe]' (the tokenizers package)"


class TokenizerMismatch(ValueError):
    """The tokenizer a node would use is not the run's."""


def parse_tokenizer(value: object) -> tuple[str, int | None]:
    """``""`` -> ("", None); ``"byte"`` -> ("byte", 256); ``"bpe:N"`` -> ("bpe", N)."""
    if value == "":
        return "", None
    if value == "byte":
        return "byte", 256
    if isinstance(value, str) and value.startswith("bpe:") and value[4:].isdigit():
        n = int(value[4:])
        if BPE_MIN <= n <= BPE_MAX:
            return "bpe", n
    raise ValueError(f"tokenizer: must be '' (the data's symbols), 'byte' or 'bpe:N' with "
                     f"{BPE_MIN} <= N <= {BPE_MAX}, got {value!r}")


def tokenizer_tag(spec: DataSpec) -> str | None:
    """What the model config records: the BPE tokenizer's SHA-256, "byte", or None."""
    kind, _ = parse_tokenizer(spec.tokenizer)
    return spec.tokenizer_sha256 if kind == "bpe" else (kind or None)


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise RuntimeError(f"a BPE tokenizer needs the tokenizers package: {INSTALL_HINT}"
                           ) from None
    return tokenizers


def train_bpe(docs: Sequence[str], vocab_size: int, *, split_words: bool) -> str:
    """tokenizer.json of a byte-level BPE with `vocab_size` tokens trained on `docs`.

    `split_words`: pre-split on the GPT-2 regex (words, numbers, punctuation), as for text;
    False keeps each document whole (the synthetic language has no words)."""
    tk = _tokenizers()
    byte_level = tk.pre_tokenizers.ByteLevel
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = byte_level(add_prefix_space=False, use_regex=split_words)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                     initial_alphabet=byte_level.alphabet(), special_tokens=[])
    tok.train_from_iterator(list(docs), trainer, length=len(docs))
    return str(tok.to_str())


def pack(tokenizer_json: str) -> tuple[str, str]:
    """(sha256 hex of the JSON's UTF-8 bytes, base64 of its zlib compression)."""
    raw = tokenizer_json.encode("utf-8")
    blob = base64.b64encode(zlib.compress(raw, 9)).decode("ascii")
    return hashlib.sha256(raw).hexdigest(), blob


def unpack(blob: str, sha256: str) -> str:
    """The tokenizer.json in `blob`, checked against `sha256` (TokenizerMismatch if not)."""
    try:
        z = zlib.decompressobj()
        raw = z.decompress(base64.b64decode(blob.encode("ascii"), validate=True), MAX_JSON)
        complete = z.eof
    except (ValueError, zlib.error) as exc:
        raise TokenizerMismatch(f"the run's tokenizer blob does not decode: {exc}") from None
    got = hashlib.sha256(raw).hexdigest()
    if not complete or got != sha256:
        raise TokenizerMismatch(f"tokenizer mismatch: the run's tokenizer has SHA-256 "
                                f"{sha256[:16]}, the tokenizer.json here {got[:16]}")
    return raw.decode("utf-8")


class Bpe:
    """A trained tokenizer.json: encode documents, name and measure its tokens."""

    def __init__(self, tokenizer_json: str) -> None:
        self.tok = _tokenizers().Tokenizer.from_str(tokenizer_json)
        self.vocab_size = int(self.tok.get_vocab_size())
        self.vocab = [str(self.tok.id_to_token(i)) for i in range(self.vocab_size)]
        # byte-level: each character of a token string stands for one byte
        self.token_bytes = np.array([len(t) for t in self.vocab], dtype=np.float64)

    def encode(self, docs: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tok.encode_batch(list(docs))]


def _windows(ids: Sequence[np.ndarray], t: int) -> np.ndarray:
    """Windows of t + 1 tokens, stride t, inside each document (none spans two)."""
    parts = [sliding_window_view(a, t + 1)[::t] for a in ids if len(a) >= t + 1]
    return np.concatenate(parts) if parts else np.zeros((0, t + 1), dtype=np.int64)


def _markov_docs(spec: DataSpec, kind: str) -> tuple[list[str], list[str], Any]:
    """Train and val documents of the synthetic language, and its source.

    byte: the default's windows, one document each (so the floor is the default's exactly).
    bpe: chains of the same total length as the default's windows (n * (T + 1) symbols),
    256 (train) and 16 (val) of them, each starting stationary; windows never span two."""
    from ml.data import MarkovSource, markov_symbols

    src = MarkovSource.random(spec.vocab_size, spec.order, spec.concentration, spec.seed,
                              backoff=spec.backoff)
    sym = markov_symbols(spec.vocab_size)
    length = spec.context + 1
    docs: list[list[str]] = []
    for stream, n, chains in ((1, spec.n_train, 256), (2, spec.n_val, 16)):
        rng = np.random.default_rng((spec.seed, stream))
        if kind == "byte":
            rows = src.sample(n, length, rng)
        else:
            k = min(chains, n)
            rows = src.sample(k, math.ceil(n * length / k), rng)
        docs.append(["".join(sym[i] for i in row) for row in rows])
    return docs[0], docs[1], src


def _text_docs(spec: DataSpec) -> tuple[list[str], list[str]]:
    """The text file's train and val parts, split by characters as the default does."""
    from ml.data import _read_text, _text_split

    text = _read_text(spec)
    split = _text_split(len(text), spec.val_fraction, 1)
    if split is None:
        raise ValueError(f"path: text has {len(text)} characters, too few to split")
    return [text[:split]], [text[split:]]


def _docs(spec: DataSpec) -> tuple[list[str], list[str], Any]:
    kind, _ = parse_tokenizer(spec.tokenizer)
    if spec.kind == "markov":
        if spec.vocab_size > ASCII_SYMBOLS:  # beyond, a symbol is 3 bytes: floors would mix
            raise ValueError(f"tokenizer {spec.tokenizer!r}: the synthetic language has one "
                             f"byte per symbol up to {ASCII_SYMBOLS} symbols, got "
                             f"{spec.vocab_size}")
        return _markov_docs(spec, kind)
    if spec.kind == "text":
        return (*_text_docs(spec), None)
    raise ValueError(f"tokenizer {spec.tokenizer!r}: for language data (markov, text), "
                     f"not {spec.kind!r}")


def prepare_spec(spec: DataSpec) -> DataSpec:
    """At run creation: train the spec's BPE tokenizer on its training text and put it in
    the spec (sha256 + blob); other specs come back as they are."""
    kind, n = parse_tokenizer(spec.tokenizer)
    if kind != "bpe" or spec.tokenizer_blob is not None:
        return spec
    assert n is not None
    train, _, _ = _docs(spec)
    sha, blob = pack(train_bpe(train, n, split_words=spec.kind == "text"))
    if len(blob) > MAX_BLOB:
        raise ValueError(f"tokenizer {spec.tokenizer!r}: its compressed tokenizer.json is "
                         f"{len(blob)} bytes, over the {MAX_BLOB} the Welcome carries; "
                         "use fewer tokens")
    return dataclasses.replace(spec, tokenizer_sha256=sha, tokenizer_blob=blob)


def _byte_ids(docs: Sequence[str]) -> list[np.ndarray]:
    return [np.frombuffer(d.encode("utf-8"), dtype=np.uint8).astype(np.int64) for d in docs]


def load_tokenized(spec: DataSpec) -> Dataset:
    """The language dataset of `spec` under its tokenizer ("byte" or a prepared "bpe:N")."""
    from ml.data import _lm_dataset

    kind, _ = parse_tokenizer(spec.tokenizer)
    train_docs, val_docs, src = _docs(spec)
    if kind == "bpe":
        if spec.tokenizer_blob is None or spec.tokenizer_sha256 is None:
            raise ValueError(f"tokenizer {spec.tokenizer!r}: the spec carries no trained "
                             "tokenizer (ml.tokenizer.prepare_spec makes it at run creation)")
        bpe = Bpe(unpack(spec.tokenizer_blob, spec.tokenizer_sha256))
        vocab, token_bytes = bpe.vocab, bpe.token_bytes
        train_ids, val_ids = bpe.encode(train_docs), bpe.encode(val_docs)
    else:
        vocab = [bytes([b]).decode("latin-1") for b in range(256)]
        token_bytes = np.ones(256)
        train_ids, val_ids = _byte_ids(train_docs), _byte_ids(val_docs)
    t = spec.context
    train, val = _windows(train_ids, t), _windows(val_ids, t)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"tokenizer {spec.tokenizer!r}: the {'val' if len(train) else 'train'}"
                         f" split has no window of {t + 1} tokens; use more text or a shorter "
                         "context")
    floor = src.window_floor(t) if src is not None and kind == "byte" else None
    rate = src.entropy_rate if src is not None else None
    per_token = float(token_bytes[val[:, 1:]].mean())
    ds = _lm_dataset(train, val, vocab, floor, rate, per_token)
    if spec.tokenizer_ids is not None and (got := ids_digest(ds)) != spec.tokenizer_ids:
        version = getattr(_tokenizers(), "__version__", "?") if kind == "bpe" else "-"
        raise TokenizerMismatch(f"tokenizer mismatch: this node's tokenizers ({version}) "
                                f"encodes the run's text differently (token digest {got[:16]},"
                                f" the run's {spec.tokenizer_ids[:16]})")
    return ds


def ids_digest(ds: Dataset) -> str:
    """SHA-256 over a language dataset's token windows (train and val, x and y)."""
    h = hashlib.sha256()
    for a in (ds.x_train, ds.y_train, ds.x_val, ds.y_val):
        h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
    return h.hexdigest()


def seal_spec(spec: DataSpec, ds: Dataset) -> DataSpec:
    """At run creation, after loading: record the token windows' digest, so that a node whose
    tokenizer encodes the text differently is refused where it tokenizes."""
    if not spec.tokenizer:
        return spec
    return dataclasses.replace(spec, tokenizer_ids=ids_digest(ds))


def bits_per_byte(loss_nats: float | None, bytes_per_token: float | None) -> float | None:
    """Loss per token (nats) as bits per byte (per symbol for the synthetic language)."""
    if loss_nats is None or not bytes_per_token:
        return None
    return loss_nats / bytes_per_token / math.log(2)


TOKENIZER_FILE = "tokenizer.json"


def keep_tokenizer_file(folder: str | Path, spec: DataSpec) -> Path | None:
    """Write the spec's BPE tokenizer.json into the run's `folder` (created or resumed); a
    file there that is not the run's tokenizer is refused (TokenizerMismatch)."""
    if spec.tokenizer_blob is None or spec.tokenizer_sha256 is None:
        return None
    text = unpack(spec.tokenizer_blob, spec.tokenizer_sha256)
    path = Path(folder) / TOKENIZER_FILE
    if path.exists():
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != spec.tokenizer_sha256:
            raise TokenizerMismatch(f"{path} has SHA-256 {got[:16]}, the run's tokenizer "
                                    f"{spec.tokenizer_sha256[:16]}: not this run's")
        return path
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, "utf-8")
    tmp.replace(path)
    return path
