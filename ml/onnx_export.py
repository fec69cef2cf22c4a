"""Export a run's zoo model as ONNX graphs for browser nodes (ONNX Runtime Web).

Two graphs per model config, both taking the parameters as ONE flat float32 vector in the
layout of ``ml.zoo.flatten`` (``named_parameters()`` order, the same bytes the
protocol ships), so a tab feeds the vector it received and gets a vector to send back:

``train_step.onnx`` -- one inner step: forward + backward + grad-norm clip + AdamW, in-graph.
    inputs:  params f32[N], exp_avg f32[N], exp_avg_sq f32[N], lr f32[], step f32[], x, y
    outputs: loss f32[], new_params f32[N], new_exp_avg f32[N], new_exp_avg_sq f32[N]
    ``step`` is the 1-based index of THIS update (torch's ``state["step"]`` after its
    increment): feed 1, 2, 3, ... and zeros for the state on the first step.
``infer.onnx`` -- inputs params f32[N], x; output logits.

x / y: gpt-tiny x int64[batch, T] tokens, y int64[batch, T] targets (T = context in the train
graph; ``seq`` = 1..context in the inference graph); mlp-digits x f32[batch, n_inputs],
y int64[batch]. ``batch`` is symbolic in both graphs.

The math is the trainer's (native_node.trainer): ``loss_fn`` (mean one-hot cross-entropy),
``clip_grad_norm_(1.0)`` then ``torch.optim.AdamW(betas=(0.9, 0.95), eps=1e-8,
weight_decay=0.01)`` with decoupled weight decay and bias correction. Recipe: make_fx
(symbolic) over ``torch.func.grad_and_value``, then ``torch.onnx.export(dynamo=True)``; see
docs/onnx.md and docs/pitfalls.md.

Graphs are cached under ``<out_dir>/<key>/`` where key = sha256(canonical JSON of the model
config, a digest of the code that builds the graphs (``code_digest``: this module, the zoo,
the fan-out rewrite, the layout, torch's version) and the inner-optimizer settings), so a change
in how graphs are built never reads an old entry and nobody has to bump a version by hand. A
directory is written under a temporary name and renamed into place, so a present key directory
is always complete. ``default_cache_root()`` is the per-user root servers share
(``$DAA_ONNX_CACHE``, else ``$XDG_CACHE_HOME/daa-prime/onnx``, else
``~/.cache/daa-prime/onnx``): a new run of a model exported before starts in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ml import tab_limits
from ml.zoo import build_model, loss_for, manifest
from ml.zoo import model_config as zoo_model_config
from shared.frame import canonical_json
from shared.layout import make_manifest, manifest_json, model_id

__all__ = [
    "EXPORTER_VERSION",
    "INFER_INPUTS",
    "INFER_OUTPUTS",
    "INNER_ADAMW",
    "OPSET",
    "TRAIN_INPUTS",
    "TRAIN_OUTPUTS",
    "ExportedGraphs",
    "InnerAdamW",
    "cache_key",
    "cached_graphs",
    "code_digest",
    "default_cache_root",
    "export_graphs",
    "infer_fn",
    "main",
    "train_step_fn",
]

log = logging.getLogger("ml.onnx_export")

EXPORTER_VERSION = "3"  # the manifest format; the cache key follows the code (code_digest)
OPSET = 20
MANIFEST_NAME = "manifest.json"
TRAIN_FILE, INFER_FILE = "train_step.onnx", "infer.onnx"
TRAIN_INPUTS = ("params", "exp_avg", "exp_avg_sq", "lr", "step", "x", "y")
TRAIN_OUTPUTS = ("loss", "new_params", "new_exp_avg", "new_exp_avg_sq")
INFER_INPUTS = ("params", "x")
INFER_OUTPUTS = ("logits",)
_ONNX_DTYPES = {1: "float32", 7: "int64", 6: "int32", 9: "bool", 10: "float16", 11: "float64"}


@dataclass(frozen=True, kw_only=True)
class InnerAdamW:
    """The inner optimizer the graphs bake in; must match native_node.trainer."""

    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8  # torch.optim.AdamW's default
    weight_decay: float = 0.01
    clip_norm: float = 1.0  # torch.nn.utils.clip_grad_norm_(params, clip_norm)

    def to_json(self) -> dict[str, Any]:
        return {"name": "adamw", "betas": [self.beta1, self.beta2], "eps": self.eps,
                "weight_decay": self.weight_decay, "clip_grad_norm": self.clip_norm,
                "step": "1-based index of this update"}


INNER_ADAMW = InnerAdamW()


@dataclass(frozen=True, kw_only=True)
class ExportedGraphs:
    key: str  # cache key: sha256 of config + code digest + optimizer
    dir: Path  # <out_dir>/<key>
    train_step: Path
    infer: Path
    manifest_path: Path
    manifest: dict[str, Any]
    cached: bool  # True when the graphs were already on disk
    export_s: float  # seconds spent exporting now (0.0 on a cache hit)


_GRAPH_CODE = ("ml/onnx_export.py", "ml/onnx_fan.py", "ml/tab_limits.py", "ml/zoo.py",
               "shared/layout.py")


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over the source of the modules that build the graphs, and torch's version (as
    ml.data's dataset cache does for the data it generates)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256(torch.__version__.encode())
    for rel in _GRAPH_CODE:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes())
    return h.hexdigest()[:32]


def cache_key(model_cfg: Mapping[str, Any], opt: InnerAdamW = INNER_ADAMW) -> str:
    blob = canonical_json({"model_config": dict(model_cfg), "code": code_digest(),
                           "inner_optimizer": opt.to_json()})
    return hashlib.sha256(blob).hexdigest()


def default_cache_root() -> Path:
    """The per-user graph cache servers share (module docstring)."""
    env = os.environ.get("DAA_ONNX_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "daa-prime" / "onnx"


def cached_graphs(model_config: Mapping[str, Any], out_dir: Path,
                  opt: InnerAdamW = INNER_ADAMW) -> ExportedGraphs | None:
    """The complete cache entry of ``model_config`` under ``out_dir``, or None (cheap: reads
    the manifest and hashes the two files; exports nothing)."""
    key = cache_key(model_config, opt)
    final = Path(out_dir) / key
    doc = _load_cached(final, key)
    return None if doc is None else _result(final, key, doc, cached=True, seconds=0.0)


def _layout(model: torch.nn.Module) -> tuple[list[str], list[tuple[int, ...]], list[int]]:
    names, shapes, sizes = [], [], []
    for name, p in model.named_parameters():
        names.append(name)
        shapes.append(tuple(p.shape))
        sizes.append(p.numel())
    return names, shapes, sizes


def _unflatten(model: torch.nn.Module) -> Callable[[Tensor], dict[str, Tensor]]:
    names, shapes, sizes = _layout(model)

    def split(flat: Tensor) -> dict[str, Tensor]:
        parts = torch.split(flat, sizes)
        return {n: c.reshape(s) for n, c, s in zip(names, parts, shapes, strict=True)}

    return split


def infer_fn(model: torch.nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """``(params, x) -> logits`` with the parameters as one flat vector."""
    split = _unflatten(model)

    def infer(params: Tensor, x: Tensor) -> Tensor:
        out: Tensor = torch.func.functional_call(model, split(params), (x,))
        return out

    return infer


def train_step_fn(model: torch.nn.Module, opt: InnerAdamW = INNER_ADAMW
                  ) -> Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The train-step graph as a torch function (what gets traced and exported).

    ``(params, exp_avg, exp_avg_sq, lr, step, x, y) -> (loss, params', exp_avg', exp_avg_sq')``;
    the same operations, in the same order, as clip_grad_norm_ + torch.optim.AdamW's
    single-tensor path (weight decay first, lerp for the first moment, bias corrections).
    """
    split = _unflatten(model)
    loss_fn = loss_for(model)  # the model's own loss (ml/byo.py), else the zoo's
    b1, b2, eps, wd, clip = opt.beta1, opt.beta2, opt.eps, opt.weight_decay, opt.clip_norm

    def step_fn(params: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, lr: Tensor, step: Tensor,
                x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        def loss_of(flat: Tensor) -> Tensor:
            return loss_fn(torch.func.functional_call(model, split(flat), (x,)), y)

        grad, loss = torch.func.grad_and_value(loss_of)(params)
        # Per-tensor sums of squares over each tensor's own rows, like clip_grad_norm_'s
        # per-tensor norms: one float32 ReduceSum over all N entries drifts by ~4e-6 in ORT.
        squares = [(g * g).sum(-1).sum() for g in split(grad).values()]
        total_norm = torch.sqrt(torch.stack(squares).sum())
        grad = grad * torch.clamp(clip / (total_norm + 1e-6), max=1.0)
        new_params = params * (1.0 - lr * wd)
        new_m = exp_avg + (grad - exp_avg) * (1.0 - b1)  # exp_avg.lerp_(grad, 1 - beta1)
        new_v = exp_avg_sq * b2 + grad * grad * (1.0 - b2)
        bias1 = 1.0 - torch.pow(torch.tensor(b1, dtype=torch.float32), step)
        bias2 = 1.0 - torch.pow(torch.tensor(b2, dtype=torch.float32), step)
        denom = torch.sqrt(new_v) / torch.sqrt(bias2) + eps
        new_params = new_params - (lr / bias1) * (new_m / denom)
        return loss, new_params, new_m, new_v

    return step_fn


def _example_batch(cfg: Mapping[str, Any], batch: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    if cfg["task"] == "lm":
        vocab, t = int(cfg["vocab_size"]), int(cfg["context"])
        x = torch.randint(0, vocab, (batch, t), generator=gen)
        return x, torch.randint(0, vocab, (batch, t), generator=gen)
    n_in, n_out = int(cfg["n_inputs"]), int(cfg["n_classes"])
    x = torch.randn(batch, n_in, generator=gen)
    return x, torch.randint(0, n_out, (batch,), generator=gen)


class _TrainGraph(torch.nn.Module):
    """Explicit positional inputs (tuples of params confuse ``dynamic_shapes``)."""

    def __init__(self, gm: torch.nn.Module) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, params: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, lr: Tensor,
                step: Tensor, x: Tensor, y: Tensor) -> Any:
        return self.gm(params, exp_avg, exp_avg_sq, lr, step, x, y)


class _InferGraph(torch.nn.Module):
    def __init__(self, gm: torch.nn.Module) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, params: Tensor, x: Tensor) -> Any:
        return self.gm(params, x)


def _export(fn: Callable[..., Any], wrapper: type[torch.nn.Module], args: tuple[Tensor, ...],
            in_names: Sequence[str], out_names: Sequence[str],
            dynamic: Mapping[str, Mapping[int, Any]], path: Path) -> float:
    """make_fx(symbolic) over fn, then the dynamo ONNX exporter; returns seconds taken."""
    from torch.fx.experimental.proxy_tensor import make_fx

    t0 = time.perf_counter()
    gm = make_fx(fn, tracing_mode="symbolic")(*args)
    shapes = {name: (dict(dynamic[name]) if name in dynamic else None) for name in in_names}
    # The exporter prints progress to stdout: keep stdout clean for the CLI's manifest.
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        program = torch.onnx.export(wrapper(gm).eval(), args, dynamo=True, dynamic_shapes=shapes,
                                    external_data=False, opset_version=OPSET,
                                    input_names=list(in_names), output_names=list(out_names),
                                    verbose=False, optimize=False)
        if program is None:
            raise RuntimeError("torch.onnx.export returned no program")
        _safe_optimize(program.model)
        program.save(str(path), external_data=False)
    _inline(path)
    return time.perf_counter() - t0


# onnxscript's default rewrite rules minus the "no-op" ones (x + 0, x - 0, x * 1, x / 1,
# Dropout): their constant matcher is tolerant (abs_tol=1e-8, rel_tol=1e-5), so ``x + 1e-8``
# -- AdamW's eps -- is deleted as ``x + 0``. The rules kept are exact, value-preserving
# rewrites (casts, reshapes, slices, transposes, min/max/relu/clip fusion).
_SAFE_RULES = (
    "cast_cast_rule", "cast_constant_of_shape_rule", "cast_constant_of_shape_without_value_rule",
    "collapse_slice_rule", "collapse_slice2_rule", "flatten_to_reshape_rule",
    "materialize_reshape_shape_rule", "max_max_rule", "max_min_rule", "min_max_rule",
    "min_min_rule", "no_op_cast_rule", "no_op_dynamic_scatter_nd_rule", "no_op_expand_rule",
    "no_op_static_scatter_nd_rule", "no_op_transpose_rule", "reshape_reshape_rule",
    "slice_split_rule", "squeeze_reshape_1d_rule", "successive_clip_relu_rule",
    "successive_clip_rule", "successive_relu_clip_rule", "successive_relu_rule",
    "transpose_transpose_rule", "unsqueeze_unsqueeze_rule",
)


def _safe_optimize(model: Any) -> None:
    """``torch.onnx.export(optimize=True)`` without the eps-eating rules, in place.

    Same passes as onnxscript.optimizer.optimize_ir (inline, 2 rounds of constant folding +
    rewrites + dead-node removal, lift constants, dedupe initializers, CSE) with _SAFE_RULES.
    """
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnx_ir.passes import common as passes
    from onnxscript import rewriter
    from onnxscript.rewriter.rules import common as rules

    safe = [getattr(rules, name) for name in _SAFE_RULES]
    passes.InlinePass()(model)
    for _ in range(2):
        onnxscript.optimizer.fold_constants(model)
        rewriter.rewrite(model, pattern_rewrite_rules=safe)
        onnxscript.optimizer.remove_unused_nodes(model)
    ir.passes.Sequential(
        passes.RemoveUnusedNodesPass(),
        passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        passes.DeduplicateInitializersPass(),
        passes.CommonSubexpressionEliminationPass(),
        passes.RemoveUnusedNodesPass(),
    )(model)


def _inline(path: Path) -> None:
    """Make sure the graph's tensors live inside the .onnx file (no ``.onnx.data``), and cap
    Split / Concat fan at ml.onnx_fan.MAX_FAN (WebGPU's storage-buffer limit)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    from ml.onnx_fan import limit_fan

    proto = onnx.load(str(path), load_external_data=True)
    sidecars = [p for p in path.parent.iterdir() if p.name.startswith(path.name + ".")]
    rewritten = limit_fan(proto)
    if rewritten or sidecars or any(uses_external_data(t) for t in proto.graph.initializer):
        onnx.save(proto, str(path), save_as_external_data=False)
        for extra in sidecars:
            extra.unlink()


def _describe(path: Path, seconds: float) -> dict[str, Any]:
    import onnx

    data = path.read_bytes()
    proto = onnx.load_from_string(data)

    def io(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
            out.append({"name": v.name, "dtype": _ONNX_DTYPES.get(tt.elem_type,
                                                                   str(tt.elem_type)),
                        "shape": shape})
        return out

    return {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "nodes": len(proto.graph.node), "ir_version": int(proto.ir_version),
            "opset": max(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            "inputs": io(proto.graph.input), "outputs": io(proto.graph.output),
            "export_s": round(seconds, 3)}


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def _load_cached(final: Path, key: str) -> dict[str, Any] | None:
    """The manifest of a complete cache entry for ``key``, or None."""
    try:
        doc = json.loads((final / MANIFEST_NAME).read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("key") != key:
            return None
        for entry in doc["graphs"].values():
            data = (final / entry["file"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return doc


def _result(final: Path, key: str, doc: dict[str, Any], *, cached: bool,
            seconds: float) -> ExportedGraphs:
    return ExportedGraphs(key=key, dir=final, train_step=final / TRAIN_FILE,
                          infer=final / INFER_FILE, manifest_path=final / MANIFEST_NAME,
                          manifest=doc, cached=cached, export_s=seconds)


def export_graphs(model_config: dict[str, Any], out_dir: Path,
                  opt: InnerAdamW = INNER_ADAMW) -> ExportedGraphs:
    """Export (or reuse) the train-step and inference graphs of ``model_config``.

    ``out_dir`` is the cache root; the graphs land in ``out_dir/<cache_key>/`` together with
    ``manifest.json``. CPU-heavy (seconds to tens of seconds): call it off the event loop.
    """
    cfg = dict(model_config)
    key = cache_key(cfg, opt)
    root = Path(out_dir)
    final = root / key
    doc = _load_cached(final, key)
    if doc is not None:
        return _result(final, key, doc, cached=True, seconds=0.0)
    with _lock_for(key):
        doc = _load_cached(final, key)  # another thread may have finished meanwhile
        if doc is not None:
            return _result(final, key, doc, cached=True, seconds=0.0)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=root))
        # the exporter warns once per torchvision op it cannot register; none of ours use them
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        try:
            t0 = time.perf_counter()
            doc = _export_into(cfg, key, tmp, opt)
            total = time.perf_counter() - t0
            tmp.chmod(0o755)  # mkdtemp makes it 0700
            try:
                os.rename(tmp, final)
            except OSError:
                theirs = _load_cached(final, key)
                if theirs is not None:  # another process won the race: keep its directory
                    shutil.rmtree(tmp, ignore_errors=True)
                    return _result(final, key, theirs, cached=True, seconds=0.0)
                stale = Path(tempfile.mkdtemp(prefix=f".stale-{key[:16]}-", dir=root))
                os.rename(final, stale / "old")  # a broken entry: set it aside, then retry
                os.rename(tmp, final)
                shutil.rmtree(stale, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    graphs = doc["graphs"]
    train = graphs.get("train_step", {"bytes": 0, "nodes": 0})
    log.info("onnx export %s/%s key %s in %.1fs: train_step %d KB %d nodes, infer %d KB %d nodes",
             cfg.get("name"), cfg.get("flavour"), key[:12], total, train["bytes"] // 1024,
             train["nodes"], graphs["infer"]["bytes"] // 1024, graphs["infer"]["nodes"])
    return _result(final, key, doc, cached=False, seconds=total)


def _export_into(cfg: dict[str, Any], key: str, tmp: Path, opt: InnerAdamW) -> dict[str, Any]:
    import onnx
    import onnxscript

    model = build_model(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    slots = make_manifest(manifest(model))
    n = sum(s.length for s in slots)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    x, y = _example_batch(cfg, batch=4)
    batch = torch.export.Dim("batch")
    train_s, train_error = 0.0, tab_limits.train_unavailable(n)  # no tab can train it: skip
    try:
        if train_error is None:
            zeros = torch.zeros(n, dtype=torch.float32)
            train_args = (flat, zeros, zeros.clone(), torch.tensor(1e-3), torch.tensor(1.0),
                          x, y)
            train_s = _export(train_step_fn(model, opt), _TrainGraph, train_args,
                              TRAIN_INPUTS, TRAIN_OUTPUTS, {"x": {0: batch}, "y": {0: batch}},
                              tmp / TRAIN_FILE)
    except Exception as exc:  # a bring-your-own model's train step may not export: tabs are
        if cfg.get("name") != "byo":  # told why and offered inference (docs/byo_model.md)
            raise
        train_error = {"reason": "export_failed", "detail": f"{type(exc).__name__}: {exc}"[:2000]}
        log.warning("train-step export of %s failed (tabs offer inference only): %s",
                    cfg.get("factory"), train_error["detail"][:300])
    infer_dyn: dict[int, Any] = {0: batch}
    if cfg["task"] == "lm":
        infer_dyn[1] = torch.export.Dim("seq", min=1, max=int(cfg["context"]))
    infer_s = _export(infer_fn(model), _InferGraph, (flat, x), INFER_INPUTS, INFER_OUTPUTS,
                      {"x": infer_dyn}, tmp / INFER_FILE)
    doc: dict[str, Any] = {
        "format": "daa-prime-onnx",
        "exporter_version": EXPORTER_VERSION,
        "key": key,
        "model_id": model_id(cfg, slots),
        "model_config": cfg,
        "n_params": n,
        "layout": manifest_json(slots),
        "opset": OPSET,
        "inner_optimizer": opt.to_json(),
        "graphs": ({"infer": _describe(tmp / INFER_FILE, infer_s)} if train_error else
                   {"train_step": _describe(tmp / TRAIN_FILE, train_s),
                    "infer": _describe(tmp / INFER_FILE, infer_s)}),
        **({"train_unavailable": train_error} if train_error else {}),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxscript": onnxscript.__version__},
    }
    (tmp / MANIFEST_NAME).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n",
                                     encoding="utf-8")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ml.onnx_export",
                                 description="Export a zoo model's ONNX train-step and "
                                             "inference graphs; prints the manifest.")
    ap.add_argument("--model", help="zoo model name (gpt-tiny, mlp-digits)")
    ap.add_argument("--model-config", type=json.loads, default=None,
                    help="instead of --model...: a full model config as JSON (what a run's "
                         "workload holds; the server's prewarm child passes it)")
    ap.add_argument("--flavour", default=None)
    ap.add_argument("--vocab-size", type=int, default=32,
                    help="gpt-tiny only; must be the run's (markov data: 32, the default)")
    ap.add_argument("--context", type=int, default=None, help="gpt-tiny only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path, help="cache root directory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # our timing line; the exporter's INFO chatter stays off
    if args.model_config is not None:
        if not isinstance(args.model_config, dict):
            ap.error("--model-config: a JSON object is required")
        cfg = args.model_config
    elif args.model is None:
        ap.error("one of --model and --model-config is required")
    else:
        try:
            cfg = zoo_model_config(args.model, args.flavour, vocab_size=args.vocab_size,
                                   context=args.context, seed=args.seed)
        except ValueError as exc:
            ap.error(str(exc))
    result = export_graphs(cfg, args.out)
    print(json.dumps({**result.manifest, "dir": str(result.dir), "cached": result.cached},
                     indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
