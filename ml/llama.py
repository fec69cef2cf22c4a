"""A Llama-style decoder, written functionally like the rest of the zoo.

RMSNorm, rotary position embeddings (half-split, as in GPT-NeoX and Llama), SwiGLU
feed-forward, no biases, input and output embeddings tied. Every operation is a plain tensor
expression (no ``nn.Linear``, no fused attention, no data-dependent shapes), so the train step
traces through ``make_fx`` over ``torch.func.grad_and_value`` and exports to ONNX exactly as
gpt-tiny's does (ml/onnx_export.py).

Flavours run from about 2M to about 125M parameters at a byte-level vocabulary (256 tokens),
plus a 0.1M "tiny" one for tests; :func:`llama_param_count` gives the exact count for any
config without building the model. A run's vocabulary is its tokenizer's (ml/tokenizer.py:
the data's symbols, 256 bytes, or a BPE trained on the run's text).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["LLAMA_FLAVOURS", "Llama", "LlamaBlock", "llama_param_count"]

# d_model, n_layers, n_heads, hidden (SwiGLU width), context. Counts at vocab 256:
# tiny 117,056; 2m 1,820,352; 20m 19,110,400; 125m 122,900,736 (tests/test_llama.py checks them).
LLAMA_FLAVOURS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "hidden": 176, "context": 32},
    "2m": {"d_model": 192, "n_layers": 4, "n_heads": 4, "hidden": 512, "context": 128},
    "20m": {"d_model": 512, "n_layers": 6, "n_heads": 8, "hidden": 1376, "context": 256},
    "125m": {"d_model": 768, "n_layers": 13, "n_heads": 12, "hidden": 3072, "context": 256},
}

RMS_EPS = 1e-5
ROPE_BASE = 10000.0


def _cfg_int(config: Mapping[str, object], key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config[{key!r}]: expected a positive int, got {value!r}")
    return value


def llama_param_count(config: Mapping[str, object]) -> int:
    """Exact parameter count of :class:`Llama` for ``config`` (tied embeddings counted once)."""
    vocab, d = _cfg_int(config, "vocab_size"), _cfg_int(config, "d_model")
    layers, hidden = _cfg_int(config, "n_layers"), _cfg_int(config, "hidden")
    per_layer = 2 * d + 4 * d * d + 3 * d * hidden  # two norms, q/k/v/o, gate/up/down
    return vocab * d + layers * per_layer + d


def _param(gen: torch.Generator, shape: tuple[int, ...], std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float32) * std)


def rms_norm(x: Tensor, weight: Tensor) -> Tensor:
    """``x / rms(x) * weight`` over the last dimension."""
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + RMS_EPS) * weight


def rope_tables(t: int, head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin tables ``[T, head_dim / 2]`` for positions 0..t-1."""
    half = head_dim // 2
    inv = torch.exp(
        torch.arange(half, device=device, dtype=torch.float32) * (-math.log(ROPE_BASE) / half)
    )
    angles = torch.arange(t, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[B, H, T, D]`` pairwise (first half with second half) by position."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class LlamaBlock(nn.Module):
    """Pre-RMSNorm block: causal self-attention with RoPE, then a SwiGLU feed-forward."""

    def __init__(
        self, d: int, n_heads: int, hidden: int, n_layers: int, gen: torch.Generator
    ) -> None:
        super().__init__()
        std, out_std = 0.02, 0.02 / math.sqrt(2 * n_layers)
        self.n_heads = n_heads
        self.attn_norm = nn.Parameter(torch.ones(d))
        self.wq, self.wk = _param(gen, (d, d), std), _param(gen, (d, d), std)
        self.wv, self.wo = _param(gen, (d, d), std), _param(gen, (d, d), out_std)
        self.ffn_norm = nn.Parameter(torch.ones(d))
        self.w_gate, self.w_up = _param(gen, (hidden, d), std), _param(gen, (hidden, d), std)
        self.w_down = _param(gen, (d, hidden), out_std)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape
        nh, hd = self.n_heads, d // self.n_heads
        a = rms_norm(x, self.attn_norm)
        q = (a @ self.wq.t()).reshape(b, t, nh, hd).transpose(1, 2)
        k = (a @ self.wk.t()).reshape(b, t, nh, hd).transpose(1, 2)
        v = (a @ self.wv.t()).reshape(b, t, nh, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        pos = torch.arange(t, device=x.device)
        causal = pos[None, :] <= pos[:, None]
        att = torch.softmax(att.masked_fill(~causal, -1e9), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + y @ self.wo.t()
        m = rms_norm(x, self.ffn_norm)
        gate = m @ self.w_gate.t()
        m = (gate * torch.sigmoid(gate)) * (m @ self.w_up.t())  # SwiGLU: silu(gate) * up
        return x + m @ self.w_down.t()


class Llama(nn.Module):
    """Llama-style decoder: int64 ``[B, T]`` tokens -> float32 ``[B, T, V]`` logits."""

    task = "lm"

    def __init__(self, config: Mapping[str, object]) -> None:
        super().__init__()
        vocab, d = _cfg_int(config, "vocab_size"), _cfg_int(config, "d_model")
        n_layers, n_heads = _cfg_int(config, "n_layers"), _cfg_int(config, "n_heads")
        hidden, self.context = _cfg_int(config, "hidden"), _cfg_int(config, "context")
        if d % n_heads or (d // n_heads) % 2:
            raise ValueError(
                f"config: d_model {d} must split into {n_heads} heads of even width"
            )
        seed = config.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"config['seed']: expected a non-negative int, got {seed!r}")
        gen = torch.Generator().manual_seed(seed)
        self.config = dict(config)
        self.head_dim = d // n_heads
        self.wte = _param(gen, (vocab, d), 0.02)  # tied: also the output projection
        self.blocks = nn.ModuleList(
            LlamaBlock(d, n_heads, hidden, n_layers, gen) for _ in range(n_layers)
        )
        self.norm = nn.Parameter(torch.ones(d))

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds context {self.context}")
        cos, sin = rope_tables(t, self.head_dim, idx.device)
        x = self.wte[idx]
        for block in self.blocks:
            x = block(x, cos, sin)
        return rms_norm(x, self.norm) @ self.wte.t()
