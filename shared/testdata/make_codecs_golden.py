"""Generate shared/testdata/codecs.json: golden vectors for every update codec.

Run from anywhere:  python shared/testdata/make_codecs_golden.py          (rewrites the file)
                    python shared/testdata/make_codecs_golden.py --check  (exit 1 if stale)

Plain JSON, so other implementations (the browser's JavaScript) can check their encoder and
decoder against the Python one byte for byte:

    {"version": 1,
     "valid": [{"name": "int8-block/minmax-b16",      # unique label
                "codec": "int8-block", "wire_id": 3,  # registry name, first payload byte
                "params": {"block": 16, ...},         # make_codec(codec, **params)
                "length": 53,                         # number of float32 values
                "layout": null,                       # or [{"name", "shape", "offset",
                                                      #      "length"}] (powersgd)
                "input_hex": "...",                   # the input, little-endian float32
                "payload_hex": "...",                 # encode(input): exact bytes
                "decoded_hex": "...",                 # decode(payload): little-endian f32
                "exact_encode": true}],               # false: see below
     "invalid": [{"name": "...", "payload_hex": "...", "length": 4, "layout": null,
                  "field": "payload"}]}               # decoding must be refused (BadUpdate)

Every encoder must reproduce `payload_hex` exactly and every decoder `decoded_hex` exactly
(pure-Python and numpy paths alike). The one exception is PowerSGD's ENCODER
(`exact_encode: false`): it multiplies matrices and runs a QR, which BLAS builds round
differently, so an implementation only has to decode `payload_hex` exactly and produce an
encoding whose decode lies within 1e-4 (relative L2) of `decoded_hex`.

Inputs come from Python's `random` with fixed seeds (no numpy needed to regenerate), plus
hand-picked edge values: +-0, subnormals, fp16/bf16 rounding ties, saturation, equal
magnitudes (top-k ties), constant and all-zero blocks, lengths that are not a multiple of
the block.
"""

from __future__ import annotations

import json
import math
import random
import struct
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT = HERE / "codecs.json"
FORMAT_VERSION = 1

if str(ROOT) not in sys.path:  # run as a script: make `shared` importable
    sys.path.insert(0, str(ROOT))


def f32(xs: list[float]) -> list[float]:
    """Round to float32 (what the vectors hold)."""
    return list(struct.unpack(f"<{len(xs)}f", struct.pack(f"<{len(xs)}f", *xs)))


def gauss(seed: int, n: int, scale: float = 1.0) -> list[float]:
    rng = random.Random(seed)
    return f32([rng.gauss(0.0, scale) for _ in range(n)])


def heavy(seed: int, n: int, scale: float = 1e-3) -> list[float]:
    """Student-t with 3 degrees of freedom, times `scale`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chi2 = sum(rng.gauss(0.0, 1.0) ** 2 for _ in range(3))
        out.append(scale * rng.gauss(0.0, 1.0) / math.sqrt(chi2 / 3))
    return f32(out)


F16_TIES = [1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 2049.0, 2051.0, -(1.0 + 2 ** -11),
            2 ** -25, 3 * 2 ** -25, 2 ** -24 + 2 ** -25, 65519.99, 65520.0, -1e6]
SPECIALS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, -1e-45, 1.17549435e-38, 5.9604645e-08,
            6.1035156e-05, 6.0975552e-05, 65504.0, 3.4028234663852886e38, -3.3e38,
            3.3961e38, 1e-30, 123.456, -7.0]
BF16_TIES = [1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 1.0 + 2 ** -8 + 2 ** -20]
TIES = f32([0.5, -0.5, 0.25, 0.5, -0.25, 0.5, 0.125, -0.5] * 5)


def blocks_with_structure() -> list[float]:
    """Zero block, constant block, -0.0 block, constant negative, then noise; 16 each."""
    return f32([0.0] * 16 + [0.75] * 16 + [-0.0] * 16 + [-3.0] * 16 + gauss(7, 21, 0.01))


def cases() -> list[tuple[str, str, dict[str, Any], list[float], Any]]:
    """(label, codec, params, input, layout shapes or None)."""
    sp = f32(SPECIALS)
    return [
        ("raw32/specials", "raw32", {}, sp, None),
        ("raw32/gauss", "raw32", {}, gauss(1, 24), None),
        ("fp16/specials", "fp16", {}, f32(SPECIALS + F16_TIES), None),
        ("fp16/heavy", "fp16", {}, heavy(2, 40), None),
        ("bf16/specials", "bf16", {}, f32(SPECIALS + BF16_TIES), None),
        ("bf16/gauss", "bf16", {}, gauss(3, 40), None),
        ("int8-block/default", "int8-block", {}, heavy(4, 300), None),
        ("int8-block/absmax-b16", "int8-block", {"block": 16}, blocks_with_structure(), None),
        ("int8-block/minmax-b16", "int8-block", {"block": 16, "mode": "minmax"},
         blocks_with_structure(), None),
        ("int8-block/absmax-fp16-b10", "int8-block", {"block": 10, "scale_dtype": "fp16"},
         f32(gauss(5, 33, 1e-3) + sp[:10]), None),
        ("int8-block/minmax-fp16-b7", "int8-block",
         {"block": 7, "mode": "minmax", "scale_dtype": "fp16"}, heavy(6, 50, 1.0), None),
        ("int8-block/ties-b8", "int8-block", {"block": 8}, TIES, None),
        ("int4-block/default", "int4-block", {}, heavy(8, 129), None),
        ("int4-block/absmax-fp16-b8-odd", "int4-block", {"block": 8, "scale_dtype": "fp16"},
         blocks_with_structure()[:37], None),
        ("int4-block/minmax-fp32-b8", "int4-block",
         {"block": 8, "mode": "minmax", "scale_dtype": "fp32"}, gauss(9, 36, 0.1), None),
        ("topk/default", "topk", {}, heavy(10, 300), None),
        ("topk/int8-b4", "topk", {"fraction": 0.1, "block": 4}, heavy(11, 200), None),
        ("topk/fp16-ties", "topk", {"fraction": 0.25, "values": "fp16"}, TIES, None),
        ("topk/all", "topk", {"fraction": 1.0, "values": "fp16"}, f32(SPECIALS[:8]), None),
        ("topk/gaps", "topk", {"fraction": 0.02, "values": "fp16"},
         f32([0.0] * 150 + [1.0] + [0.0] * 140 + [-2.0, 0.0, 0.0, 0.5] + [0.0] * 5), None),
        ("powersgd/rank2", "powersgd", {"rank": 2}, gauss(12, 160, 0.01),
         [("w", (12, 10)), ("b", (10,)), ("v", (3, 2, 5))]),
        ("powersgd/rank4-mixed", "powersgd", {"rank": 4}, heavy(13, 196),
         [("emb", (16, 6)), ("small", (4, 4)), ("sq", (6, 6)), ("bias", (6,)),
          ("w", (3, 6, 1, 1)),
          ("ln", (6,)), ("tail", (0,)), ("s", (18,))]),
    ]


def hexf(xs: Any) -> str:
    from array import array

    a = array("f", xs)
    if sys.byteorder == "big":  # pragma: no cover
        a.byteswap()
    return a.tobytes().hex()


def build() -> dict[str, Any]:
    from shared.codecs import BY_WIRE_ID, CODECS, make_codec
    from shared.codecs.powersgd import layout_of
    from shared.layout import manifest_json
    from shared.vec import numpy_module

    valid = []
    for label, name, params, xs, shapes in cases():
        codec = make_codec(name, **params)
        layout = layout_of(shapes) if shapes else None
        if name == "powersgd":
            if numpy_module() is None:
                raise SystemExit("powersgd golden vectors need numpy to encode")
            payload = codec.encode(xs, layout=layout, use_numpy=True)
        else:
            payload = codec.encode(xs, use_numpy=False)
        decoded = codec.decode(payload, len(xs), layout=layout, use_numpy=False)
        valid.append({"name": label, "codec": name, "wire_id": CODECS[name].wire_id,
                      "params": params, "length": len(xs),
                      "layout": manifest_json(layout) if layout else None,
                      "input_hex": hexf(xs), "payload_hex": payload.hex(),
                      "decoded_hex": hexf(decoded), "exact_encode": name != "powersgd"})
    assert set(BY_WIRE_ID) == {v["wire_id"] for v in valid}, "a codec has no golden vector"
    return {"version": FORMAT_VERSION, "valid": valid, "invalid": invalid_cases()}


def invalid_cases() -> list[dict[str, Any]]:
    """Payloads a decoder must refuse, each with the BadUpdate field it reports."""
    one = struct.pack("<f", 1.0)
    rows: list[tuple[str, bytes, int, str]] = [
        ("empty", b"", 1, "payload"),
        ("unknown-wire-id", b"\x63" + one, 1, "codec"),
        ("raw32-short", b"\x00" + one[:3], 1, "payload"),
        ("raw32-long", b"\x00" + one + b"\x00", 1, "payload"),
        ("raw32-nan", b"\x00" + struct.pack("<f", math.nan), 1, "payload"),
        ("fp16-inf", b"\x01\x00\x7c", 1, "payload"),
        ("bf16-odd-size", b"\x02\x80\x3f\x00", 1, "payload"),
        ("int8-bad-mode", b"\x03\x02\x00\x00" + struct.pack("<I", 4) + one + b"\x01", 1,
         "payload"),
        ("int8-block-0", b"\x03\x00\x00\x00" + struct.pack("<I", 0) + one + b"\x01", 1,
         "payload"),
        ("int8-reserved", b"\x03\x00\x00\x01" + struct.pack("<I", 4) + one + b"\x01", 1,
         "payload"),
        ("int8-negative-scale", b"\x03\x00\x00\x00" + struct.pack("<If", 4, -1.0) + b"\x01",
         1, "payload"),
        ("int8-q-minus-128", b"\x03\x00\x00\x00" + struct.pack("<I", 4) + one + b"\x80", 1,
         "payload"),
        ("int8-huge-declared-length", b"\x03\x00\x00\x00" + struct.pack("<I", 1) + one
         + b"\x01", 1 << 40, "payload"),
        ("int4-nibble-0", b"\x04\x00\x00\x00" + struct.pack("<I", 4) + one + b"\x00", 1,
         "payload"),
        ("int4-pad-nibble", b"\x04\x00\x00\x00" + struct.pack("<I", 4) + one + b"\x99", 1,
         "payload"),
        ("topk-k-over-length", b"\x05\x01\x00\x00" + struct.pack("<II", 3, 0)
         + b"\x00\x3c" * 3 + b"\x00\x01\x01", 2, "payload"),
        ("topk-huge-k", b"\x05\x01\x00\x00" + struct.pack("<II", 0xFFFFFFFF, 0), 10,
         "payload"),
        ("topk-index-repeats", b"\x05\x01\x00\x00" + struct.pack("<II", 2, 0)
         + b"\x00\x3c" * 2 + b"\x01\x00", 4, "payload"),
        ("topk-index-out-of-range", b"\x05\x01\x00\x00" + struct.pack("<II", 1, 0)
         + b"\x00\x3c" + b"\x04", 4, "payload"),
        ("topk-non-minimal-varint", b"\x05\x01\x00\x00" + struct.pack("<II", 1, 0)
         + b"\x00\x3c" + b"\x81\x00", 4, "payload"),
        ("topk-trailing-byte", b"\x05\x01\x00\x00" + struct.pack("<II", 1, 0)
         + b"\x00\x3c" + b"\x01\x00", 4, "payload"),
        ("topk-fp16-with-block", b"\x05\x01\x00\x00" + struct.pack("<II", 1, 8)
         + b"\x00\x3c" + b"\x01", 4, "payload"),
        ("powersgd-no-layout", b"\x06\x00\x04\x00" + one, 1, "layout"),
        ("powersgd-rank-0", b"\x06\x00\x00\x00" + one, 1, "payload"),
    ]
    return [{"name": n, "payload_hex": p.hex(), "length": length, "layout": None,
             "field": field} for n, p, length, field in rows]


def render() -> str:
    return json.dumps(build(), indent=1) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale; run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
