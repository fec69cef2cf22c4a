"""What a browser tab can train: the rule of browser/node/node.js's `trainUnavailable`, in
Python, so that the server does not export a train step that no tab can run.

A tab's train step holds the params, both AdamW moments, their three outputs and the gradient
(7 float32 copies) in one wasm32 heap of at most 4 GiB; node.js keeps that under 2 GiB
(TAB_STATE_BYTES). Over it, the ONNX export leaves the train step out and its manifest says
why (`train_unavailable`, the very reason and detail the tab would compute itself), so the tab
offers inference only, as before. tests/test_tab_limits.py checks both sides agree.
"""

from __future__ import annotations

TAB_STATE_BYTES = 2 ** 31  # browser/node/node.js TAB_STATE_BYTES
STATE_COPIES = 7  # float32 copies of the params a tab's train step holds


def train_unavailable(n_params: int) -> dict[str, str] | None:
    """{reason, detail} when no tab can train a model of `n_params` parameters, else None."""
    need = STATE_COPIES * 4 * n_params
    if need <= TAB_STATE_BYTES:
        return None
    return {"reason": "too_large",
            "detail": f"{n_params:,} parameters need {need / 2 ** 30:.1f} GiB of training "
                      f"state; a tab holds at most {TAB_STATE_BYTES / 2 ** 30:g} GiB"}
