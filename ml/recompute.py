"""Activation checkpointing for the inner steps of large models on a CPU node.

A model's backward pass needs what its forward pass computed. At llama 125m and batch 2 x 256
tokens a CPU step held ~1.2 GB above the model state and its gradients (RSS, measured in
one process), mostly the saved activations of the 13 blocks (attention scores, softmax, the
SwiGLU's hidden-width tensors): more than two copies of the model (docs/benchmarks.md). With
`recompute_blocks` each block keeps only its input during the forward pass and runs its
forward again inside the backward pass (torch.utils.checkpoint, non-reentrant): one block's
activations at a time, for one more forward pass of compute. The recomputed forward is the
same arithmetic on the same inputs, so the gradients are the same bits
(tests/test_recompute.py checks them against the plain backward).

The trainer turns it on by itself on CPU for models of `RECOMPUTE_MIN_PARAMS` parameters or
more (the zoo's small models keep the faster plain backward; a GPU has the memory).
"""

from __future__ import annotations

from typing import Any

import torch

RECOMPUTE_MIN_PARAMS = 50_000_000  # from here on a CPU trainer recomputes its blocks


def wants_recompute(model: torch.nn.Module, device: torch.device) -> bool:
    """The trainer's default: CPU, a model of RECOMPUTE_MIN_PARAMS or more, and blocks."""
    return (device.type == "cpu" and _blocks(model) is not None
            and sum(p.numel() for p in model.parameters()) >= RECOMPUTE_MIN_PARAMS)


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    blocks = getattr(model, "blocks", None)  # the zoo's transformers keep theirs here
    return blocks if isinstance(blocks, torch.nn.ModuleList) and len(blocks) else None


def recompute_blocks(model: torch.nn.Module) -> bool:
    """Make each of `model.blocks` save only its input and recompute the rest in the
    backward pass (while gradients are on; under no_grad it runs as before). False when the
    model has no such blocks (nothing changed)."""
    from torch.utils.checkpoint import checkpoint  # imported only where it is used

    blocks = _blocks(model)
    if blocks is None:
        return False
    for block in blocks:
        if getattr(block, "_recomputed", False):
            continue
        plain = block.forward

        def forward(*args: Any, _plain: Any = plain) -> Any:
            if not torch.is_grad_enabled():
                return _plain(*args)
            return checkpoint(_plain, *args, use_reentrant=False)

        block.forward = forward
        block._recomputed = True  # type: ignore[assignment]
    return True
