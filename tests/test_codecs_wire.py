"""Codec wire behaviour: decode_update, adversarial payloads, golden vectors, no-numpy runs."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import tracemalloc
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.codecs import CODECS, Raw32, decode_payload, decode_update, get_codec, make_codec
from shared.codecs.powersgd import layout_of
from shared.errors import BadUpdate

GOLDEN = Path(__file__).resolve().parent.parent / "shared" / "testdata" / "codecs.json"


def rel_err(x: Any, y: Any) -> float:
    x64 = np.asarray(x, np.float64)
    return float(np.linalg.norm(np.asarray(y, np.float64) - x64) / np.linalg.norm(x64))


# -- decode_update -----------------------------------------------------------------------------
def test_decode_update_expect_and_unknown() -> None:
    payload = get_codec("fp16").encode(np.ones(4, np.float32))
    assert decode_update(payload, 4, expect="fp16").tolist() == [1.0] * 4
    for expect in ("raw32", "zstd-magic"):
        with pytest.raises(BadUpdate) as info:
            decode_update(payload, 4, expect=expect)
        assert info.value.field == "codec"
        assert expect in str(info.value)
    with pytest.raises(BadUpdate) as info:
        decode_update(b"\x99" + payload[1:], 4)
    assert info.value.field == "codec"
    with pytest.raises(BadUpdate) as info:
        decode_update(payload, -1)
    assert info.value.field == "length"
    with pytest.raises(BadUpdate, match="wire id"):
        Raw32().decode(payload, 4)  # a codec refuses another codec's payload


@pytest.mark.parametrize("payload", [
    b"\x00" + struct.pack("<3f", 1.0, math.nan, 2.0),
    b"\x00" + struct.pack("<3f", 1.0, math.inf, 2.0),
    b"\x01" + struct.pack("<3e", 1.0, -math.inf, 2.0),
    b"\x02" + struct.pack("<3H", 0x3F80, 0x7FC0, 0),
    b"\x03\x00\x00\x00" + struct.pack("<If3b", 4, 3e38, 127, 1, 0),  # 127 * 3e38 overflows
])
@pytest.mark.parametrize("use_numpy", [True, False])
def test_decode_update_refuses_non_finite(payload: bytes, use_numpy: bool) -> None:
    decode_payload(payload, 3, use_numpy=use_numpy)  # decodes ...
    with pytest.raises(BadUpdate) as info:  # ... but is not a usable update
        decode_update(payload, 3, use_numpy=use_numpy)
    assert info.value.field == "payload"


def test_decoded_vectors_are_writable_copies() -> None:
    payload = bytearray(get_codec("raw32").encode(np.ones(4, np.float32)))
    out = decode_update(payload, 4)
    out += 1
    assert payload == get_codec("raw32").encode(np.ones(4, np.float32))


# -- allocation bounded by length --------------------------------------------------------------
ADVERSARIAL = [
    (b"\x00" + b"\x00" * 4, 1 << 40),  # raw32: huge declared length, tiny payload
    (b"\x03\x00\x00\x00" + struct.pack("<I", 1) + b"\x00" * 8, 1 << 40),
    (b"\x04\x01\x01\x00" + struct.pack("<I", 1) + b"\x00" * 8, 1 << 40),
    (b"\x05\x00\x00\x00" + struct.pack("<II", 0xFFFFFFFF, 1), 1 << 40),  # huge k
    (b"\x05\x00\x00\x00" + struct.pack("<II", 50, 1) + b"\x00" * 300 + b"\xff" * 10**6, 100),
    (b"\x05\x01\x00\x00" + struct.pack("<II", 5, 0) + b"\x00" * 10 + b"\x01" * 10**6, 10),
    (b"\x06\x00\xff\xff" + b"\x00" * 65, 16),  # rank 65535
]


@pytest.mark.parametrize(("payload", "length"), ADVERSARIAL)
@pytest.mark.parametrize("use_numpy", [True, False])
def test_declared_sizes_cannot_force_allocation(payload: bytes, length: int,
                                                use_numpy: bool) -> None:
    layout = layout_of([("w", (4, 4))]) if payload[0] == 6 else None
    tracemalloc.start()
    try:
        with pytest.raises(BadUpdate):
            decode_payload(payload, length, layout=layout, use_numpy=use_numpy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 + 2 * len(payload), peak


# -- golden vectors ----------------------------------------------------------------------------
def golden() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(GOLDEN.read_text())
    return doc


def test_golden_covers_every_codec() -> None:
    data = golden()
    assert data["version"] == 1
    assert {v["codec"] for v in data["valid"]} == set(CODECS)


@pytest.mark.parametrize("case", golden()["valid"], ids=lambda c: c["name"])
def test_golden_valid(case: dict[str, Any]) -> None:
    codec = make_codec(case["codec"], **case["params"])
    layout = layout_of([(s["name"], tuple(s["shape"])) for s in case["layout"]]) \
        if case["layout"] else None
    xs = array("f", bytes.fromhex(case["input_hex"]))
    payload = bytes.fromhex(case["payload_hex"])
    assert payload[0] == case["wire_id"] == codec.wire_id
    for use_numpy in (True, False):
        out = decode_update(payload, case["length"], expect=case["codec"], layout=layout,
                            use_numpy=use_numpy)
        assert bytes(np.asarray(out, np.float32).tobytes()).hex() == case["decoded_hex"]
    if case["exact_encode"]:
        assert codec.encode(xs).hex() == case["payload_hex"]
        assert codec.encode(np.asarray(xs, np.float32)).hex() == case["payload_hex"]
    else:  # PowerSGD: BLAS-dependent bits; the decode must agree closely
        mine = codec.decode(codec.encode(np.asarray(xs), layout=layout), len(xs), layout=layout)
        want = np.frombuffer(bytes.fromhex(case["decoded_hex"]), "<f4")
        assert rel_err(want, mine) < 1e-4


@pytest.mark.parametrize("case", golden()["invalid"], ids=lambda c: c["name"])
@pytest.mark.parametrize("use_numpy", [True, False])
def test_golden_invalid(case: dict[str, Any], use_numpy: bool) -> None:
    with pytest.raises(BadUpdate) as info:
        decode_update(bytes.fromhex(case["payload_hex"]), case["length"], use_numpy=use_numpy)
    assert info.value.field == case["field"]


def test_golden_file_is_current() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_codecs_golden",
                                                  GOLDEN.parent / "make_codecs_golden.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fresh = json.loads(mod.render())
    stored = golden()
    for a, b in zip(fresh["valid"], stored["valid"], strict=True):
        if a["exact_encode"]:
            assert a == b, a["name"]
    assert fresh["invalid"] == stored["invalid"]


def test_works_without_numpy() -> None:
    """As in Pyodide: importing shared.codecs loads no numpy, and with numpy unavailable
    every codec but PowerSGD's encoder runs (array('f') out), reproducing the golden file."""
    script = r"""
import json, sys
sys.modules["numpy"] = None  # import numpy -> ImportError
import shared.codecs as c
from array import array
from shared.codecs.powersgd import layout_of
data = json.load(open(sys.argv[1]))
for case in data["valid"]:
    layout = layout_of([(s["name"], tuple(s["shape"])) for s in case["layout"]]) \
        if case["layout"] else None
    payload = bytes.fromhex(case["payload_hex"])
    out = c.decode_update(payload, case["length"], expect=case["codec"], layout=layout)
    assert isinstance(out, array) and out.tobytes().hex() == case["decoded_hex"], case["name"]
    if case["exact_encode"]:
        codec = c.make_codec(case["codec"], **case["params"])
        xs = array("f", bytes.fromhex(case["input_hex"])).tolist()  # a plain list
        assert codec.encode(xs).hex() == case["payload_hex"], case["name"]
print("ok", len(data["valid"]))
"""
    clean = "import sys, shared.codecs; assert 'numpy' not in sys.modules; print('clean')"
    root = GOLDEN.parent.parent.parent
    for code, args in ((clean, []), (script, [str(GOLDEN)])):
        res = subprocess.run([sys.executable, "-c", code, *args], cwd=root,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(("ok", "clean"))
