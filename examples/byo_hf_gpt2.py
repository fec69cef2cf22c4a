"""A bring-your-own model built from a Hugging Face `transformers` config (no weights are
downloaded): GPT-2, 2 layers, width 64, on the run's token data (docs/byo_model.md).

    python -m server --model examples.byo_hf_gpt2:build --data markov
    python -m native_node join --coordinator HOST:PORT --allow-model examples.byo_hf_gpt2:build

`transformers` is not a dependency of DAA Prime: install it where this runs. Two choices make
the train step export for tabs:

- an explicit all-ones ``attention_mask``: without one, transformers' causal-mask code checks
  the position ids for packed sequences with ``(mask[:, -1] == 0).all()`` in Python
  (masking_utils.find_packed_sequence_indices), a data-dependent branch the export's symbolic
  trace cannot follow;
- eager attention and untied embeddings (every parameter once in ``named_parameters()``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ml.byo import BatchSpec, ModelSpec


class HFGPT2(nn.Module):
    """int64 [B, T] tokens -> float32 [B, T, V] logits."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=int(config["vocab_size"]), n_positions=int(config["context"]),
                         n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, tie_word_embeddings=False, bos_token_id=0,
                         eos_token_id=0)
        cfg._attn_implementation = "eager"
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
            torch.manual_seed(int(config["seed"]))
            self.hf = GPT2LMHeadModel(cfg)

    def forward(self, idx: Tensor) -> Tensor:
        out = self.hf(input_ids=idx, attention_mask=torch.ones_like(idx), use_cache=False)
        logits: Tensor = out.logits
        return logits


def build(config: dict[str, Any]) -> ModelSpec:
    """The factory: ``config`` carries seed, task and the data's vocab_size and context."""
    if config["task"] != "lm":
        raise ValueError(f"byo_hf_gpt2 is a language model; this run's data is {config['task']!r}")
    t, v = int(config["context"]), int(config["vocab_size"])
    batch = BatchSpec(task="lm", x_shape=(t,), y_shape=(t,), out_shape=(t, v), x_dtype="int64")
    return ModelSpec(module=HFGPT2(config), batch=batch)
