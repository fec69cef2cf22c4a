"""What one run trains: a zoo model config + a data spec, resolved the same way everywhere.

The server resolves it from the run config when it creates the run; nodes rebuild it from
the Welcome message (model config + data spec dicts) and check the model id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml.byo import ENTRY_POINT_GROUP, byo_config, check, resolve_factory
from ml.data import Dataset, DataSpec, load_dataset, load_dataset_cached
from ml.tokenizer import TokenizerMismatch, prepare_spec, seal_spec, tokenizer_tag
from ml.zoo import MODELS, build_model, flatten, manifest, model_config
from shared.layout import TensorSlot, make_manifest, model_id

NATURAL_DATA = {"lm": "markov", "classify": "digits"}


@dataclass(frozen=True, eq=False)
class Workload:
    model_config: dict[str, Any]  # complete zoo config (JSON-able)
    data_spec: DataSpec  # complete data spec
    dataset: Dataset  # loaded arrays
    manifest: tuple[TensorSlot, ...]  # flat parameter layout
    model_id: str  # hash of config + layout

    @property
    def n_params(self) -> int:
        return sum(s.length for s in self.manifest)

    def new_model(self) -> torch.nn.Module:
        return build_model(self.model_config)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve(*, model: str, flavour: str | None, data: str | None, data_path: str | None,
            partition: str, alpha: float, seed: int, tokenizer: str = "") -> Workload:
    """Build the workload a new run trains, from the run config's fields. A model that is
    not a zoo name is a bring-your-own factory (ml/byo.py), checked here before any run state
    is written. `tokenizer` (ml/tokenizer.py): "" the data's symbols, "byte", or "bpe:N",
    trained here on the run's training text."""
    byo = None if model in MODELS else resolve_factory(model)
    if model not in MODELS and byo is None:
        raise ValueError(f"unknown model {model!r}; known: {sorted(MODELS)}, a "
                         f"'package.module:factory', or an installed {ENTRY_POINT_GROUP!r} "
                         "entry point")
    if byo is not None and tokenizer:
        raise ValueError(f"tokenizer {tokenizer!r} is for the zoo's language models, not a "
                         "bring-your-own model")
    if byo is not None:
        return _resolve_byo(byo, flavour=flavour, data=data, data_path=data_path,
                            partition=partition, alpha=alpha, seed=seed)
    task = MODELS[model].task
    kind = data or NATURAL_DATA[task]
    if (task == "lm") != (kind in ("markov", "text")):
        raise ValueError(f"model {model!r} ({task}) cannot train on data {kind!r}")
    probe = model_config(model, flavour, vocab_size=2, seed=seed)
    context = int(probe.get("context", 64))  # type: ignore[call-overload]
    spec = DataSpec(kind=kind, seed=seed, context=context, partition=partition, alpha=alpha,
                    path=str(Path(data_path).resolve()) if data_path else None,
                    sha256=file_sha256(data_path) if kind == "text" and data_path else None,
                    tokenizer=tokenizer)
    spec = prepare_spec(spec)  # trains a BPE tokenizer on the training text
    dataset = load_dataset(spec)
    spec = seal_spec(spec, dataset)  # the token windows' digest, checked by every node
    vocab = len(dataset.vocab) if dataset.vocab is not None else None
    if task == "lm" and kind == "markov" and not tokenizer:
        vocab = spec.vocab_size
    cfg = model_config(model, flavour, vocab_size=vocab, context=context, seed=seed)
    if (tag := tokenizer_tag(spec)) is not None:
        cfg["tokenizer"] = tag  # part of the model id: another tokenizer is another model
    return from_spec(cfg, spec, dataset=dataset)


def _resolve_byo(byo: tuple[str, str | None], *, flavour: str | None, data: str | None,
                 data_path: str | None, partition: str, alpha: float, seed: int) -> Workload:
    kind = data or "digits"
    task = "lm" if kind in ("markov", "text") else "classify"
    spec = DataSpec(kind=kind, seed=seed, context=64, partition=partition, alpha=alpha,
                    path=str(Path(data_path).resolve()) if data_path else None,
                    sha256=file_sha256(data_path) if kind == "text" and data_path else None)
    dataset = load_dataset(spec)
    if task == "lm":
        vocab = spec.vocab_size if kind == "markov" else len(dataset.vocab or [])
        sizes = {"vocab_size": vocab, "context": spec.context}
    else:
        sizes = {"n_inputs": int(np.prod(dataset.x_train.shape[1:])),
                 "n_classes": int(np.max(dataset.y_train)) + 1}
    cfg = check(byo_config(byo[0], byo[1], task=task, seed=seed, sizes=sizes, flavour=flavour))
    return from_spec(cfg, spec, dataset=dataset)


def from_spec(model_cfg: dict[str, Any], spec: DataSpec, *, dataset: Dataset | None = None,
              local_path: str | None = None, cache_dir: Path | None = None) -> Workload:
    """Rebuild a workload from its wire form; `local_path` replaces a text file's path;
    `cache_dir` keeps the generated dataset on disk (ml.data.load_dataset_cached)."""
    if local_path is not None:
        spec = DataSpec.from_dict({**spec.to_dict(), "path": local_path})
    want, have = model_cfg.get("tokenizer"), tokenizer_tag(spec)
    if want != have:
        raise TokenizerMismatch(f"tokenizer mismatch: the model was built for tokenizer "
                                f"{str(want)[:16]}, the data spec gives {str(have)[:16]}")
    if dataset is None:
        dataset = load_dataset_cached(spec, cache_dir)
    net = build_model(model_cfg)
    slots = make_manifest(manifest(net))
    return Workload(model_config=model_cfg, data_spec=spec, dataset=dataset, manifest=slots,
                    model_id=model_id(model_cfg, slots))


def initial_params(work: Workload) -> np.ndarray:
    """theta_0: the zoo's seeded initialisation, flattened."""
    return flatten(work.new_model())
