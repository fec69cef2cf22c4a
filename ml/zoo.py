"""Model zoo, defined once in torch.

Every layer is written functionally (``x @ W.t() + b``, hand-written attention, explicit
one-hot cross-entropy) so that the models trace cleanly through ``make_fx`` over
``torch.func.grad_and_value`` for ONNX export: no ``nn.Linear``, no fused attention, no
data-dependent shapes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ml.llama import LLAMA_FLAVOURS, Llama

__all__ = [
    "MODELS",
    "GPTTiny",
    "MLPDigits",
    "ModelEntry",
    "build_model",
    "evaluate",
    "flatten",
    "load_flat",
    "loss_fn",
    "loss_for",
    "manifest",
    "model_config",
    "param_count",
]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its task, default flavour and per-flavour hyper-parameters."""

    task: str
    default_flavour: str
    flavours: Mapping[str, Mapping[str, int]]


MODELS: dict[str, ModelEntry] = {
    "gpt-tiny": ModelEntry(
        task="lm",
        default_flavour="nano",
        flavours={
            "nano": {"d_model": 64, "n_layers": 2, "n_heads": 4, "context": 64, "mlp_ratio": 4},
            "micro": {
                "d_model": 128,
                "n_layers": 4,
                "n_heads": 4,
                "context": 128,
                "mlp_ratio": 4,
            },
        },
    ),
    # Llama-style decoder (ml/llama.py): RMSNorm, rotary embeddings, SwiGLU, tied embeddings
    "llama": ModelEntry(task="lm", default_flavour="2m", flavours=LLAMA_FLAVOURS),
    "mlp-digits": ModelEntry(
        task="classify",
        default_flavour="default",
        flavours={
            "default": {"n_inputs": 64, "hidden": 128, "n_classes": 10},
            "wide": {"n_inputs": 64, "hidden": 256, "n_classes": 10},
        },
    ),
}


def model_config(
    name: str,
    flavour: str | None = None,
    *,
    vocab_size: int | None = None,
    context: int | None = None,
    seed: int = 0,
) -> dict[str, object]:
    """Complete JSON-able config for ``name``/``flavour``.

    ``vocab_size`` is required for the language models (gpt-tiny, llama); ``context``
    overrides the flavour's default. Both are ignored by mlp-digits.
    """
    if name not in MODELS:
        raise ValueError(f"name: unknown model {name!r}; known: {sorted(MODELS)}")
    entry = MODELS[name]
    flav = entry.default_flavour if flavour is None else flavour
    if flav not in entry.flavours:
        raise ValueError(
            f"flavour: unknown flavour {flav!r} for {name!r}; known: {sorted(entry.flavours)}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be a non-negative int, got {seed!r}")
    cfg: dict[str, object] = {"name": name, "flavour": flav, "seed": seed, "task": entry.task}
    cfg.update(entry.flavours[flav])
    if entry.task == "lm":
        if vocab_size is None or isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise ValueError(f"vocab_size: an int is required for {name!r}, got {vocab_size!r}")
        if vocab_size < 2:
            raise ValueError(f"vocab_size: must be >= 2, got {vocab_size}")
        cfg["vocab_size"] = vocab_size
        if context is not None:
            if isinstance(context, bool) or not isinstance(context, int) or context < 1:
                raise ValueError(f"context: must be a positive int, got {context!r}")
            cfg["context"] = context
    return cfg


def _int(config: Mapping[str, object], key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config[{key!r}]: expected a non-negative int, got {value!r}")
    return value


def _normal(gen: torch.Generator, shape: tuple[int, ...], std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float32) * std)


def _uniform(gen: torch.Generator, shape: tuple[int, ...], bound: float) -> nn.Parameter:
    u = torch.rand(shape, generator=gen, dtype=torch.float32)
    return nn.Parameter((u * 2.0 - 1.0) * bound)


def _zeros(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=torch.float32))


def _ones(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.ones(shape, dtype=torch.float32))


def _gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block with hand-written causal self-attention."""

    def __init__(
        self, d_model: int, n_heads: int, mlp_ratio: int, n_layers: int, gen: torch.Generator
    ) -> None:
        super().__init__()
        d, h = d_model, d_model * mlp_ratio
        std, proj_std = 0.02, 0.02 / math.sqrt(2 * n_layers)
        self.n_heads = n_heads
        self.ln1_w, self.ln1_b = _ones(d), _zeros(d)
        self.qkv_w, self.qkv_b = _normal(gen, (3 * d, d), std), _zeros(3 * d)
        self.proj_w, self.proj_b = _normal(gen, (d, d), proj_std), _zeros(d)
        self.ln2_w, self.ln2_b = _ones(d), _zeros(d)
        self.fc_w, self.fc_b = _normal(gen, (h, d), std), _zeros(h)
        self.fc2_w, self.fc2_b = _normal(gen, (d, h), proj_std), _zeros(d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        nh, hd = self.n_heads, d // self.n_heads
        a = F.layer_norm(x, (d,), self.ln1_w, self.ln1_b)
        qkv = a @ self.qkv_w.t() + self.qkv_b
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        q = q.reshape(b, t, nh, hd).transpose(1, 2)
        k = k.reshape(b, t, nh, hd).transpose(1, 2)
        v = v.reshape(b, t, nh, hd).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        pos = torch.arange(t, device=x.device)
        causal = pos[None, :] <= pos[:, None]  # [T, T]: key index <= query index
        att = att.masked_fill(~causal, -1e9)
        att = torch.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + (y @ self.proj_w.t() + self.proj_b)
        m = F.layer_norm(x, (d,), self.ln2_w, self.ln2_b)
        m = _gelu_tanh(m @ self.fc_w.t() + self.fc_b)
        return x + (m @ self.fc2_w.t() + self.fc2_b)


class GPTTiny(nn.Module):
    """Tiny decoder-only transformer: int64 [B, T] tokens -> float32 [B, T, V] logits."""

    task = "lm"

    def __init__(self, config: Mapping[str, object]) -> None:
        super().__init__()
        vocab, d = _int(config, "vocab_size"), _int(config, "d_model")
        n_layers, n_heads = _int(config, "n_layers"), _int(config, "n_heads")
        self.context = _int(config, "context")
        if d % n_heads:
            raise ValueError(f"config: d_model {d} not divisible by n_heads {n_heads}")
        gen = torch.Generator().manual_seed(_int(config, "seed"))
        self.config = dict(config)
        self.wte = _normal(gen, (vocab, d), 0.02)
        self.wpe = _normal(gen, (self.context, d), 0.01)
        self.blocks = nn.ModuleList(
            Block(d, n_heads, _int(config, "mlp_ratio"), n_layers, gen) for _ in range(n_layers)
        )
        self.lnf_w, self.lnf_b = _ones(d), _zeros(d)
        self.head_w, self.head_b = _normal(gen, (vocab, d), 0.02), _zeros(vocab)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds context {self.context}")
        x = self.wte[idx] + self.wpe[:t]
        for block in self.blocks:
            x = block(x)
        x = F.layer_norm(x, (x.shape[-1],), self.lnf_w, self.lnf_b)
        return x @ self.head_w.t() + self.head_b


class MLPDigits(nn.Module):
    """One-hidden-layer ReLU MLP: float32 [B, 64] -> logits [B, 10]."""

    task = "classify"

    def __init__(self, config: Mapping[str, object]) -> None:
        super().__init__()
        n_in, hidden = _int(config, "n_inputs"), _int(config, "hidden")
        n_out = _int(config, "n_classes")
        gen = torch.Generator().manual_seed(_int(config, "seed"))
        self.config = dict(config)
        self.w1 = _uniform(gen, (hidden, n_in), 1.0 / math.sqrt(n_in))
        self.b1 = _uniform(gen, (hidden,), 1.0 / math.sqrt(n_in))
        self.w2 = _uniform(gen, (n_out, hidden), 1.0 / math.sqrt(hidden))
        self.b2 = _uniform(gen, (n_out,), 1.0 / math.sqrt(hidden))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(x @ self.w1.t() + self.b1)
        return h @ self.w2.t() + self.b2


def build_model(config: Mapping[str, object]) -> nn.Module:
    """Build the model described by ``config``; init is deterministic in ``config['seed']``."""
    name = config.get("name")
    if name == "gpt-tiny":
        return GPTTiny(config)
    if name == "mlp-digits":
        return MLPDigits(config)
    if name == "llama":
        return Llama(config)
    if name == "byo":  # bring your own (ml/byo.py): the factory the run was checked with
        from ml.byo import build_module

        return build_module(config)
    raise ValueError(f"config['name']: unknown model {name!r}; known: {sorted(MODELS)}")


def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy in nats via an explicit one-hot (export-friendly)."""
    n_classes = logits.shape[-1]
    onehot = (y[..., None] == torch.arange(n_classes, device=logits.device)).to(logits.dtype)
    return -(torch.log_softmax(logits, dim=-1) * onehot).sum(-1).mean()


LOSS_ATTR = "_daa_loss"  # where ml.byo leaves a bring-your-own model's own loss


def loss_for(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss ``model`` trains with everywhere (trainers, ONNX export, evaluation): a
    bring-your-own model's own loss (ml/byo.py), else :func:`loss_fn`."""
    own = model.__dict__.get(LOSS_ATTR)
    return own if callable(own) else loss_fn


def param_count(model: nn.Module) -> int:
    """Total number of scalar parameters."""
    return sum(p.numel() for p in model.parameters())


def manifest(model: nn.Module) -> list[tuple[str, tuple[int, ...], int, int]]:
    """(name, shape, offset, length) of each parameter in ``named_parameters()`` order."""
    out: list[tuple[str, tuple[int, ...], int, int]] = []
    offset = 0
    for name, p in model.named_parameters():
        n = p.numel()
        out.append((name, tuple(p.shape), offset, n))
        offset += n
    return out


def flatten(model: nn.Module) -> npt.NDArray[np.float32]:
    """All parameters as one contiguous little-endian float32 vector."""
    parts = [p.detach().cpu().reshape(-1).to(torch.float32).numpy() for p in model.parameters()]
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return np.ascontiguousarray(flat, dtype="<f4")


def load_flat(model: nn.Module, vec: npt.ArrayLike) -> None:
    """Copy a flat vector (as produced by :func:`flatten`) into the parameters in place."""
    arr = np.asarray(vec)
    if arr.ndim != 1:
        raise ValueError(f"vec: expected a 1-D array, got shape {arr.shape}")
    total = param_count(model)
    if arr.shape[0] != total:
        raise ValueError(f"vec: length {arr.shape[0]} != parameter count {total}")
    with warnings.catch_warnings():  # a read-only vec (the server's params) is only read
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        src = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(src[offset : offset + n].reshape(p.shape))
            offset += n


def evaluate(
    model: nn.Module, x: npt.ArrayLike, y: npt.ArrayLike, *, batch_size: int = 256
) -> float:
    """Mean loss in nats over the whole set (eval mode, no grad, CPU ok)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    xs, ys = np.asarray(x), np.asarray(y)
    n = int(xs.shape[0])
    if n == 0 or ys.shape[0] != n:
        raise ValueError(f"x, y: need equal non-zero lengths, got {n} and {ys.shape[0]}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                xb = torch.from_numpy(np.ascontiguousarray(xs[start : start + batch_size]))
                yb = torch.from_numpy(np.ascontiguousarray(ys[start : start + batch_size]))
                if xb.is_floating_point():
                    xb = xb.to(torch.float32)
                loss = loss_for(model)(model(xb.to(device)), yb.to(device))
                total += float(loss) * xb.shape[0]
    finally:
        model.train(was_training)
    return total / n
