"""Runs inside the tab (Pyodide): the `shared` package against its own golden vectors.

selftest.js runs this file after pyodide_host.loadShared(); `run()` returns a JSON string:
{"python", "in_browser", "numpy", "checks": [{"name", "ok", "error"?}], "signed_by_pyodide"}.
The vectors come from the unpacked zip (shared/testdata/), so they are the server's own.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any


def _attempt(name: str, fn: Callable[[], object]) -> dict[str, Any]:
    try:
        detail = fn()
    except Exception as exc:  # a failed check is data, reported to the page
        return {"name": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"name": name, "ok": True, **({"detail": detail} if detail else {})}


def _frames(doc: dict[str, Any]) -> list[dict[str, Any]]:
    from shared.errors import ProtocolError
    from shared.messages import decode_message

    out = []
    for i, vec in enumerate(doc["valid"]):
        def valid(vec: dict[str, Any] = vec) -> None:
            data = bytes.fromhex(vec["frame_hex"])
            msg = decode_message(data)
            assert type(msg).__name__ == vec["type"], type(msg).__name__
            got = {f.name: getattr(msg, f.name) for f in fields(msg)  # type: ignore[arg-type]
                   if f.name != "payload"}
            assert got == vec["fields"], got
            assert msg.to_frame() == data, "re-encoded frame differs"

        out.append(_attempt(f"py frame {i} {vec['type']}", valid))
    for vec in doc["invalid"]:
        def invalid(vec: dict[str, Any] = vec) -> str:
            try:
                decode_message(bytes.fromhex(vec["frame_hex"]))
            except ProtocolError as exc:
                got = (exc.code, exc.field)
            else:
                raise AssertionError("decoded without error")
            assert got == (vec["code"], vec["field"]), got
            return f"{got[0]}/{got[1]}"

        out.append(_attempt(f"py refuse {vec['name']}", invalid))
    return out


def _signed(doc: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Verify the golden signed frames with the tab's ML-DSA (noble through the bridge), and
    sign a new frame with the test key, for the native side to verify."""
    from shared.envelope import Identity, verify_frame
    from shared.frame import decode_frame
    from shared.messages import Submit, new_nonce, sha256_hex

    s = doc["signed"]
    pk = bytes.fromhex(s["public_key_hex"])
    out = []
    for case in s["frames"]:
        out.append(_attempt(f"py verify signed {case['type']}", lambda case=case: verify_frame(
            decode_frame(bytes.fromhex(case["frame_hex"])), public_key=pk, run_id=s["run_id"],
            node_id=s["node_id"]) and None))
    ident = Identity(public_key=pk, secret_key=bytes.fromhex(s["secret_key_hex"]))
    update = b"\x00" + bytes(8)
    nonce = new_nonce()
    msg = Submit(run_id=s["run_id"], round=7, node_id=ident.node_id, nonce=nonce, codec="raw32",
                 length=2, digest=sha256_hex(update), train_loss=None, samples=1, compute_s=0.5,
                 payload=update)
    frame = msg.to_frame(sign=ident.signer(run_id=s["run_id"], round_=7, msg_type=Submit.TYPE,
                                           nonce=nonce))
    out.append(_attempt("py verify own signature", lambda: verify_frame(
        decode_frame(frame), public_key=pk, run_id=s["run_id"], node_id=ident.node_id) and None))
    return out, frame.hex()


def _codecs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    from array import array

    from shared.codecs import decode_update, make_codec
    from shared.layout import make_manifest

    out = []
    for vec in doc["valid"]:
        layout = None
        if vec["layout"]:
            layout = make_manifest((e["name"], e["shape"], e["offset"], e["length"])
                                   for e in vec["layout"])

        def check(vec: dict[str, Any] = vec, layout: Any = layout) -> None:
            payload = bytes.fromhex(vec["payload_hex"])
            got = decode_update(payload, vec["length"], expect=vec["codec"], layout=layout)
            assert array("f", got).tobytes().hex() == vec["decoded_hex"], "decode differs"
            if vec["exact_encode"]:
                xs = array("f")
                xs.frombytes(bytes.fromhex(vec["input_hex"]))
                enc = make_codec(vec["codec"], **vec["params"]).encode(xs, layout=layout)
                assert enc.hex() == vec["payload_hex"], "encode differs"

        out.append(_attempt(f"py codec {vec['name']}", check))
    return out


def _zstd() -> list[dict[str, Any]]:
    from shared.platform import zstd

    z = zstd()
    if z is None:
        return [{"name": "py zstd round trip", "ok": False, "error": "no zstd registered"}]
    data = bytes(range(256)) * 64

    def check() -> str:
        packed = z.compress(data)
        assert z.decompress(packed, len(data)) == data
        try:
            z.decompress(packed, len(data) - 1)
        except ValueError:
            return f"{len(data)} -> {len(packed)} bytes; over-limit refused"
        raise AssertionError("an over-limit frame inflated")

    return [_attempt("py zstd round trip", check)]


def _encoder() -> list[dict[str, Any]]:
    """The tab's JS encoder (daa_glue.BrowserEncoder) gives shared.codecs' bytes, with and
    without error feedback, on a vector with a residual from a previous round."""
    import random
    import struct

    from shared.codecs import codec_params, make_codec
    from shared.codecs.base import with_error_feedback
    from shared.platform import update_encoder
    from shared.vec import from_bytes, to_bytes

    enc = update_encoder()
    if enc is None:
        return [{"name": "py update encoder", "ok": False, "error": "none registered"}]
    rng = random.Random(7)
    n = 5003
    delta = from_bytes(struct.pack(f"<{n}f", *(rng.gauss(0, 0.01) for _ in range(n))))
    residual = from_bytes(struct.pack(f"<{n}f", *(rng.gauss(0, 0.001) for _ in range(n))))
    out = []
    for name in sorted(enc.codecs):
        def check(name: str = name) -> None:
            codec = make_codec(name, **({"fraction": 0.05} if name == "topk" else {}))
            params = codec_params(codec)
            payload, res = enc.encode(name, params, to_bytes(delta), to_bytes(residual), True)
            want, want_res = with_error_feedback(codec, delta, residual)
            assert payload == want, "payload differs"
            assert (res or bytes(4 * n)) == to_bytes(want_res), "residual differs"
            plain, none = enc.encode(name, params, to_bytes(delta), None, False)
            assert plain == codec.encode(delta)
            assert none is None

        out.append(_attempt(f"py update encoder {name} = shared.codecs", check))
    return out


def run(testdata: str) -> str:
    import shared
    from shared.vec import IN_BROWSER, numpy_module

    base = Path(testdata)
    frames = json.loads((base / "frames.json").read_text(encoding="utf-8"))
    codecs = json.loads((base / "codecs.json").read_text(encoding="utf-8"))
    checks = _frames(frames)
    signed, frame_hex = _signed(frames)
    checks += signed + _codecs(codecs) + _zstd() + _encoder()
    return json.dumps({
        "python": sys.version.split()[0], "in_browser": IN_BROWSER,
        "numpy": numpy_module() is not None, "protocol_version": shared.PROTOCOL_VERSION,
        "non_stdlib_modules": sorted(m for m in sys.modules if m.split(".")[0] in (
            "numpy", "pqcrypto", "zstandard", "torch", "aiohttp")),
        "checks": checks, "signed_by_pyodide": frame_hex,
    })
