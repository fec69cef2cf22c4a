"""A participant's update encoding as one pure function: delta (+ error-feedback residual) ->
codec payload, the new residual, the codec's new state (PowerSGD's warm-started Q).

The platform's encoder (the tab's JS codecs, shared.platform) takes the codecs it lists; every
other codec goes through shared.codecs on shared.vec vectors (numpy natively, array('f') in
Pyodide). Nothing is mutated (unless the caller gives its residual up: `consume`): the
caller (shared.participant) keeps what comes back.
"""

from __future__ import annotations

from typing import Any

from shared.codecs import codec_params
from shared.codecs.base import Codec, with_error_feedback
from shared.layout import TensorSlot
from shared.platform import update_encoder
from shared.vec import Vector, add, any_nonzero, from_bytes, sub, to_bytes


def encode_update(codec: Codec, delta: Vector, *, residual: Vector | None, state: Any,
                  error_feedback: bool, layout: tuple[TensorSlot, ...] | None,
                  consume: bool = False) -> tuple[bytes, Vector | None, Any]:
    """(payload, new residual or None when nothing was lost, new codec state). `consume`:
    the caller gives `residual` up and it may become the new one, written in place
    (shared.codecs.base.with_error_feedback)."""
    fast = update_encoder()
    if fast is not None and codec.name in fast.codecs:
        res_bytes = to_bytes(residual) if error_feedback and residual is not None else None
        payload, res = fast.encode(codec.name, codec_params(codec), to_bytes(delta), res_bytes,
                                   error_feedback)
        return payload, (from_bytes(res) if error_feedback and res is not None else None), state
    if hasattr(codec, "encode_with_state"):  # PowerSGD: warm-started from the last round
        x = add(delta, residual) if error_feedback and residual is not None else delta
        payload, state = codec.encode_with_state(x, layout=layout, state=state)
        payload = bytes(payload)
        lost = sub(x, codec.decode(payload, len(x), layout=layout)) if error_feedback else None
    elif error_feedback:
        payload, lost = with_error_feedback(codec, delta, residual, layout=layout,
                                            consume=consume)
    else:
        payload, lost = bytes(codec.encode(delta, layout=layout)), None
    # a lossless codec leaves nothing to carry over
    return payload, (lost if lost is not None and any_nonzero(lost) else None), state
