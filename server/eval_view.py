"""The server's eval model of a large run, built over the params it evaluates (no copy).

`RunState.evaluate` needs a torch module holding theta'. Built the usual way (the zoo's
seeded init, then `load_flat` copying theta' in), a 125M model is one more 491 MB copy at the
server's commit, beside theta, theta' and the SparseLoCo residual (bench.scale_server). Here
the module is built on the meta device (no storage, no init) and each parameter becomes a
view of the flat float32 vector (`flatten`'s order: `model.parameters()`, a tied parameter
once). Modules with buffers (a bring-your-own model's running statistics, say) have values a
meta build does not give: they are built the usual way and loaded with `load_flat`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ml.zoo import load_flat


def model_over(new_model: Callable[[], nn.Module], params: np.ndarray) -> nn.Module:
    """A module whose parameters are views of `params` (read, never written), or a fresh
    module with `params` copied in where that cannot be done."""
    try:
        with torch.device("meta"):
            model = new_model()
    except Exception:  # a factory that cannot build on meta: the usual way
        model = None
    if model is None or any(True for _ in model.buffers()):
        model = new_model()
        load_flat(model, params)
        return model
    with warnings.catch_warnings():  # the server's params are read-only: only read here
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        src = torch.from_numpy(np.ascontiguousarray(params, dtype=np.float32))
    views: dict[int, nn.Parameter] = {}
    offset = 0
    for p in model.parameters():
        n = p.numel()
        views[id(p)] = nn.Parameter(src[offset:offset + n].view(p.shape), requires_grad=False)
        offset += n
    if offset != src.numel():
        raise ValueError(f"params: length {src.numel()} != parameter count {offset}")
    for mod in model.modules():
        for name, old in list(mod._parameters.items()):
            if old is not None:
                mod._parameters[name] = views[id(old)]
    return model
