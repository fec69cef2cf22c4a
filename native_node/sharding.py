"""FSDP for the multi-process node (native_node/distributed_trainer.py): which ranges of the
flat parameter vector a rank holds, its θ/Δ keeper, the FSDP units, and the state it holds.

Kept apart from the DDP path so that each file reads in one sitting; torch is imported where
used (the node process, which only slices numpy arrays, never needs it from here).
"""

from __future__ import annotations

from typing import Any

import numpy as np

SHARD_MODES = ("auto", "none", "full")
STATE_BYTES_PER_PARAM = 16  # float32 parameter + gradient + AdamW's two moments
FIT_HEADROOM = 1.25  # activations, the all-gathered unit, allocator slack


def needs_sharding(n_params: int, free_bytes: int) -> bool:
    """Whether parameters + gradients + AdamW state (with headroom) exceed one device's free
    memory: `--shard auto` then picks FSDP."""
    return n_params * STATE_BYTES_PER_PARAM * FIT_HEADROOM > free_bytes


def shard_ranges(shapes: list[tuple[int, ...]], rank: int, world: int) -> list[tuple[int, int]]:
    """(offset, length) in the flat parameter vector of `rank`'s dim-0 shard of each parameter
    (FSDP2's Shard(0): torch.chunk's split, ceil(rows / world) rows per rank, the last ranks
    possibly fewer or none)."""
    out: list[tuple[int, int]] = []
    offset = 0
    for shape in shapes:
        numel = int(np.prod(shape)) if shape else 1
        rows = shape[0] if shape else 1
        per_row = numel // rows if rows else 0
        chunk = -(-rows // world)
        start, stop = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
        out.append((offset + start * per_row, (stop - start) * per_row))
        offset += numel
    return out


def local_part(t: Any) -> Any:
    """A DTensor's shard on this rank (FSDP); a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


class ShardParams:
    """`DeviceParams` for FSDP: this rank's shard of θ_r on the device, and its piece of
    Δ = θ_r − θ_H brought back through one host buffer (pinned on CUDA)."""

    def __init__(self, model: Any, ranges: list[tuple[int, int]], device: Any) -> None:
        import torch

        self.params, self.device = list(model.parameters()), device
        for p, (_, n) in zip(self.params, ranges, strict=True):
            if local_part(p).numel() != n:
                raise RuntimeError(f"FSDP shard of {tuple(p.shape)} holds {local_part(p).numel()} "
                                   f"values, expected {n} (dim-0 chunks)")
        n = sum(n for _, n in ranges)
        self.theta = torch.zeros(n, dtype=torch.float32, device=device)
        self.host = torch.empty(n, dtype=torch.float32, pin_memory=device.type == "cuda")

    def set_theta(self, theta: np.ndarray) -> None:
        import torch

        self.theta.copy_(torch.from_numpy(np.ascontiguousarray(theta, dtype=np.float32)))

    def to_model(self) -> None:
        import torch

        with torch.no_grad():
            offset = 0
            for p in self.params:
                local = local_part(p)
                n = local.numel()
                local.copy_(self.theta[offset:offset + n].view_as(local))
                offset += n

    def delta(self) -> np.ndarray:
        import torch

        with torch.no_grad():
            flat = torch.cat([local_part(p).detach().reshape(-1).float() for p in self.params])
            torch.sub(self.theta, flat, out=flat)
            self.host.copy_(flat, non_blocking=self.device.type == "cuda")
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
        return self.host.numpy().copy()


def fsdp_units(model: Any) -> list[Any]:
    """The FSDP units below the root: each element of a ModuleList (gpt-tiny's blocks)."""
    import torch

    return [m for lst in model.modules() if isinstance(lst, torch.nn.ModuleList) for m in lst]


def transient_bytes(model: Any, sharded: bool) -> int:
    """Bytes a step holds beyond the rank's state (modelled from the parameter counts; on CUDA
    `state_bytes` adds the allocator's measured peak). DDP: its all-reduce buckets, a second
    copy of the gradients. FSDP: the root unit's full parameters (kept through the step), the
    running and the prefetched unit's, and one unit's full gradients before its
    reduce-scatter."""
    n = sum(p.numel() for p in model.parameters())
    if not sharded:
        return 4 * int(n)
    units = fsdp_units(model)
    inner = {id(p) for u in units for p in u.parameters()}
    root = int(sum(p.numel() for p in model.parameters() if id(p) not in inner))
    unit = max([0, *(int(sum(p.numel() for p in u.parameters())) for u in units)])
    return 4 * (root + 2 * unit + max(root, unit))


def state_bytes(model: Any, opt: Any, transient: int, device: Any) -> dict[str, int]:
    """This rank's training state: parameters, gradients and AdamW moments as held between
    steps (counted from its tensors: its shards under FSDP), `transient_bytes`, their sum
    (`peak`), and on CUDA the allocator's measured peak."""
    import torch

    def size(ts: Any) -> int:
        parts = [local_part(t) for t in ts if t is not None]
        return sum(t.numel() * t.element_size() for t in parts)

    moments = (opt.exp_avg + opt.exp_avg_sq if hasattr(opt, "exp_avg") else
               [v for st in opt.opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0])
    params = list(model.parameters())
    out = {"params": size(params), "grads": size(p.grad for p in params),
           "adamw": size(moments), "transient": transient}
    out["state"] = out["params"] + out["grads"] + out["adamw"]
    out["peak"] = out["state"] + transient
    if device.type == "cuda":
        out["cuda_peak"] = int(torch.cuda.max_memory_allocated(device))
    return out
