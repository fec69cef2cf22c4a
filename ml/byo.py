"""Bring your own model: a torch module from a factory, checked before a run uses it.

``--model package.module:factory`` (or the name of an entry point in the group
``daa_prime.models``) names a callable ``factory(config) -> ModelSpec``. ``config`` is the
run's model config: ``seed`` plus the data's sizes (``task``; ``n_inputs``/``n_classes`` for
classify, ``vocab_size``/``context`` for lm). The factory returns the module, its loss (None:
the zoo's one-hot cross-entropy, ``ml.zoo.loss_fn``) and its batch spec (what the data must
match). :func:`check` runs every rule below at server start; :func:`build_module` rebuilds the
model from the config the Welcome carries, and :func:`check_allowed` is the node's gate: a node
imports a factory only when it is an installed entry point or named by its ``--allow-model``.

Rules (docs/byo_model.md): parameters all float32 (they travel as one flat float32 vector);
no persistent buffers (they would not travel); non-persistent buffers only when a training
forward leaves them as they were (constants every node rebuilds from the config); output
``[B, *batch.out_shape]`` for the data's batch; the loss a finite scalar; the same parameters
for the same seed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ml.zoo import LOSS_ATTR, loss_fn

__all__ = ["ENTRY_POINT_GROUP", "BatchSpec", "ByoError", "ModelSpec", "build_module",
           "byo_config", "check", "check_allowed", "is_byo", "resolve_factory"]

ENTRY_POINT_GROUP = "daa_prime.models"
BYO_NAME = "byo"  # model_config["name"] of every bring-your-own model
REASONS = ("unknown", "import", "factory_raised", "wrong_return", "dtype", "buffers",
           "batch_spec", "forward", "output_shape", "loss", "nondeterministic", "not_allowed",
           "source_changed")
Loss = Callable[[Tensor, Tensor], Tensor]


class ByoError(ValueError):
    """A model factory that cannot be used; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"model factory ({reason}): {message}")
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class BatchSpec:
    """What one example looks like; checked against the run's data."""

    task: str  # "classify" (digits) or "lm" (markov / text token windows)
    x_shape: tuple[int, ...]  # one example's input: (n_inputs,) or (context,)
    y_shape: tuple[int, ...]  # one example's target: () or (context,)
    out_shape: tuple[int, ...]  # one example's output: (n_classes,) or (context, vocab_size)
    x_dtype: str = "float32"  # "float32" (classify) or "int64" (lm tokens)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What a factory returns."""

    module: nn.Module  # the model; its named_parameters() order is the wire layout
    batch: BatchSpec  # the data it takes
    loss: Loss | None = None  # (output, y) -> scalar; None: ml.zoo.loss_fn


def is_byo(config: Mapping[str, Any]) -> bool:
    return config.get("name") == BYO_NAME


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def resolve_factory(model: str) -> tuple[str, str | None] | None:
    """``(factory, entry point name)`` for a --model value that is not a zoo name: a
    ``module:attr`` string as given, or an installed entry point's value; None when it is
    neither (an unknown model)."""
    if ":" in model:
        return model, None
    value = _entry_points().get(model)
    return None if value is None else (value, model)


def _split(factory: str) -> tuple[str, str]:
    mod, _, attr = factory.partition(":")
    if not mod or not attr or not all(p.isidentifier() for p in mod.split(".") + attr.split(".")):
        raise ByoError("import", f"{factory!r} is not 'package.module:callable'")
    return mod, attr


def _load(factory: str) -> tuple[Callable[..., Any], str]:
    """The factory callable and the sha256 of its module's source file."""
    mod_name, attr = _split(factory)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as exc:
        raise ByoError("import", f"cannot import {mod_name!r}: {type(exc).__name__}: {exc}"
                       ) from exc
    obj: Any = mod
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if not callable(obj):
        raise ByoError("import", f"{mod_name!r} has no callable {attr!r}")
    return obj, _source_sha256(mod)


def _source_sha256(mod: Any) -> str:
    try:
        path = inspect.getsourcefile(mod)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""
    except (OSError, TypeError):
        return ""


def _call(factory: str, config: Mapping[str, Any]) -> tuple[ModelSpec, str]:
    fn, digest = _load(factory)
    try:
        out = fn(dict(config))
    except Exception as exc:
        raise ByoError("factory_raised", f"{factory} raised {type(exc).__name__}: {exc}"
                       ) from exc
    if not isinstance(out, ModelSpec):
        raise ByoError("wrong_return", f"{factory} returned {type(out).__name__}, "
                                       "expected ml.byo.ModelSpec(module=..., batch=..., loss=...)")
    if not isinstance(out.module, nn.Module):
        raise ByoError("wrong_return", f"ModelSpec.module is {type(out.module).__name__}, "
                                       "expected a torch.nn.Module")
    if not isinstance(out.batch, BatchSpec):
        raise ByoError("wrong_return", f"ModelSpec.batch is {type(out.batch).__name__}, "
                                       "expected ml.byo.BatchSpec")
    if out.loss is not None and not callable(out.loss):
        raise ByoError("wrong_return", "ModelSpec.loss must be callable or None")
    return out, digest


def byo_config(factory: str, entry_point: str | None, *, task: str, seed: int,
               sizes: Mapping[str, int], flavour: str | None = None) -> dict[str, Any]:
    """The model config a run of ``factory`` carries (and the factory receives, minus
    ``source_sha256``, which :func:`check` adds)."""
    cfg: dict[str, Any] = {"name": BYO_NAME, "factory": factory, "entry_point": entry_point,
                           "flavour": flavour, "seed": seed, "task": task}
    cfg.update(sizes)
    return cfg


def _factory_view(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "source_sha256"}


def build_module(config: Mapping[str, Any]) -> nn.Module:
    """The model of a checked config (what nodes and the exporter rebuild); its loss is
    attached for ml.zoo.loss_for. Refuses when the factory's source changed since the run
    was created."""
    spec, digest = _call(str(config["factory"]), _factory_view(config))
    want = config.get("source_sha256")
    if want and digest and want != digest:
        raise ByoError("source_changed", f"{config['factory']}: the module's source differs "
                       f"from the run's (sha256 {digest[:12]} here, {str(want)[:12]} in the run)")
    object.__setattr__(spec.module, LOSS_ATTR, spec.loss or loss_fn)
    return spec.module


def _expected(config: Mapping[str, Any]) -> BatchSpec:
    if config["task"] == "lm":
        t, v = int(config["context"]), int(config["vocab_size"])
        return BatchSpec(task="lm", x_shape=(t,), y_shape=(t,), out_shape=(t, v), x_dtype="int64")
    n_in, n_out = int(config["n_inputs"]), int(config["n_classes"])
    return BatchSpec(task="classify", x_shape=(n_in,), y_shape=(), out_shape=(n_out,))


def example_batch(config: Mapping[str, Any], batch: int = 4) -> tuple[Tensor, Tensor]:
    """A seeded batch shaped like the run's data."""
    gen = torch.Generator().manual_seed(0)
    if config["task"] == "lm":
        v, t = int(config["vocab_size"]), int(config["context"])
        return (torch.randint(0, v, (batch, t), generator=gen),
                torch.randint(0, v, (batch, t), generator=gen))
    x = torch.randn(batch, int(config["n_inputs"]), generator=gen)
    return x, torch.randint(0, int(config["n_classes"]), (batch,), generator=gen)


def _check_tensors(module: nn.Module) -> None:
    params = list(module.named_parameters())
    if not params:
        raise ByoError("dtype", "the module has no parameters")
    bad = [f"{n} ({p.dtype})" for n, p in params if p.dtype != torch.float32]
    if bad:
        raise ByoError("dtype", "parameters must all be float32 (they travel as one flat "
                                f"float32 vector): {', '.join(bad[:5])}")
    persistent = list(module.state_dict(keep_vars=True))
    names = {n for n, _ in params}
    stray = [n for n in persistent if n not in names]
    if stray:
        raise ByoError("buffers", f"persistent buffers do not travel in the flat parameter "
                                  f"vector: {', '.join(stray[:5])} (register them with "
                                  "persistent=False if they are constants, or make them "
                                  "parameters)")


def _check_forward(spec: ModelSpec, config: Mapping[str, Any]) -> None:
    x, y = example_batch(config)
    before = {n: b.detach().clone() for n, b in spec.module.named_buffers()}
    spec.module.train()
    try:
        out = spec.module(x)
    except Exception as exc:
        raise ByoError("forward", f"forward on a batch x {list(x.shape)} {x.dtype} raised "
                                  f"{type(exc).__name__}: {exc}") from exc
    want = (x.shape[0], *spec.batch.out_shape)
    if not isinstance(out, Tensor) or tuple(out.shape) != want or out.dtype != torch.float32:
        got = (f"{list(out.shape)} {out.dtype}" if isinstance(out, Tensor)
               else type(out).__name__)
        raise ByoError("output_shape", f"forward returned {got}, expected float32 {list(want)}")
    for n, b in spec.module.named_buffers():
        if not torch.equal(before[n], b):
            raise ByoError("buffers", f"buffer {n} changes in a training forward; its value "
                                      "would differ between nodes (it does not travel)")
    try:
        loss = (spec.loss or loss_fn)(out, y)
    except Exception as exc:
        raise ByoError("loss", f"loss(output, y) raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(loss, Tensor) or loss.ndim != 0 or not bool(torch.isfinite(loss)):
        got = (f"shape {list(loss.shape)}, value {loss.detach().reshape(-1)[:3].tolist()}"
               if isinstance(loss, Tensor) else type(loss).__name__)
        raise ByoError("loss", f"loss(output, y) must be a finite scalar tensor, got {got}")
    try:
        loss.backward()
    except Exception as exc:
        raise ByoError("loss", f"backward raised {type(exc).__name__}: {exc}") from exc
    spec.module.zero_grad(set_to_none=True)


def _flat(module: nn.Module) -> bytes:
    return b"".join(p.detach().cpu().contiguous().numpy().tobytes() for p in module.parameters())


def check(config: Mapping[str, Any]) -> dict[str, Any]:
    """Every rule of the module docstring, on ``config`` (from :func:`byo_config`); returns
    the config to store with the run (plus the factory module's ``source_sha256``).
    Raises ByoError naming what is wrong."""
    factory = str(config["factory"])
    view = _factory_view(config)
    spec, digest = _call(factory, view)
    want = _expected(view)
    if spec.batch.task != want.task:
        raise ByoError("batch_spec", f"batch.task is {spec.batch.task!r}, the run's data is "
                                     f"{want.task!r}")
    for field in ("x_shape", "y_shape", "x_dtype"):
        got, exp = getattr(spec.batch, field), getattr(want, field)
        same = got == exp if field == "x_dtype" else tuple(got) == tuple(exp)
        if not same:
            raise ByoError("batch_spec", f"batch.{field} is {got!r}, the run's data gives {exp!r}")
    if spec.loss is None and tuple(spec.batch.out_shape) != want.out_shape:
        raise ByoError("batch_spec", f"batch.out_shape is {spec.batch.out_shape!r}; the default "
                                     f"cross-entropy needs {want.out_shape!r}")
    _check_tensors(spec.module)
    _check_forward(spec, view)
    again, _ = _call(factory, view)
    if _flat(again.module) != _flat(spec.module):
        raise ByoError("nondeterministic", f"{factory} built different parameters twice for "
                                           f"seed {view.get('seed')}: seed every random init "
                                           "(torch.Generator().manual_seed(config['seed']))")
    return {**view, "source_sha256": digest}


def check_allowed(config: Mapping[str, Any], allow: Sequence[str]) -> None:
    """A node's gate before it imports anything a server named: zoo models pass; a factory
    passes when ``allow`` (the node's --allow-model) names it or an installed entry point of
    ENTRY_POINT_GROUP points at it. Raises ByoError("not_allowed") otherwise."""
    if not is_byo(config):
        return
    factory = config.get("factory")
    if not isinstance(factory, str):
        raise ByoError("not_allowed", f"the server's model config names no factory: {factory!r}")
    if factory in allow or factory in _entry_points().values():
        return
    raise ByoError("not_allowed", f"the server asks this node to import {factory!r}; run the "
                   f"node with --allow-model {factory} to allow it, or install it as a "
                   f"{ENTRY_POINT_GROUP!r} entry point")


def _parity(config: Mapping[str, Any], train_path: Path) -> dict[str, float]:
    """max |onnxruntime - torch| / max |torch| of each train-step output, one step, batch 8."""
    import onnxruntime as ort

    from ml.onnx_export import TRAIN_OUTPUTS, train_step_fn
    from ml.zoo import build_model, flatten

    model = build_model(config)
    flat = torch.from_numpy(flatten(model))
    zeros = torch.zeros_like(flat)
    x, y = example_batch(config, batch=8)
    lr, step = torch.tensor(1e-3), torch.tensor(1.0)
    want = train_step_fn(model)(flat, zeros, zeros.clone(), lr, step, x, y)
    feed = {"params": flat.numpy(), "exp_avg": zeros.numpy(), "exp_avg_sq": zeros.numpy(),
            "lr": lr.numpy(), "step": step.numpy(), "x": x.numpy(), "y": y.numpy()}
    got = ort.InferenceSession(str(train_path)).run(None, feed)
    out = {}
    for name, a, b in zip(TRAIN_OUTPUTS, want, got, strict=True):
        ref = a.detach().numpy()
        out[name] = float(abs(ref - b).max() / max(float(abs(ref).max()), 1e-30))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ml.byo package.module:factory [--data digits|markov] [--export DIR]``:
    the start-time check, and with --export the tab graphs and their parity with torch."""
    import argparse
    import json
    import time

    ap = argparse.ArgumentParser(prog="python -m ml.byo", description=main.__doc__)
    ap.add_argument("model", help="package.module:factory or a daa_prime.models entry point")
    ap.add_argument("--data", choices=("digits", "markov"), default="digits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--export", type=Path, default=None, help="export the ONNX graphs here")
    args = ap.parse_args(argv)
    from ml.workload import resolve

    try:
        work = resolve(model=args.model, flavour=None, data=args.data, data_path=None,
                       partition="iid", alpha=0.5, seed=args.seed)
    except ValueError as exc:  # ml.byo.ByoError (not this __main__ module's class)
        print(json.dumps({"model": args.model, "ok": False,
                          "reason": getattr(exc, "reason", "unknown"), "error": str(exc)}))
        return 2
    report: dict[str, Any] = {"model": args.model, "ok": True, "task": work.model_config["task"],
                              "params": work.n_params, "model_id": work.model_id}
    print(f"check passed: {args.model}, {work.n_params:,} parameters, task "
          f"{report['task']}")
    if args.export is not None:
        from ml.onnx_export import export_graphs

        t0 = time.perf_counter()
        graphs = export_graphs(work.model_config, args.export)
        report["export_s"] = round(time.perf_counter() - t0, 1)
        report["train_unavailable"] = graphs.manifest.get("train_unavailable")
        for name, g in graphs.manifest["graphs"].items():
            report[f"{name}_bytes"], report[f"{name}_nodes"] = g["bytes"], g["nodes"]
            print(f"{name:10s} {g['bytes']:>10,} bytes {g['nodes']:>6} nodes")
        if report["train_unavailable"] is None:
            report["parity"] = _parity(work.model_config, graphs.train_step)
            for name, err in report["parity"].items():
                print(f"parity {name:15s} {err:.2e}")
        else:
            print(f"train step not exported: {report['train_unavailable']['detail'][:300]}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
