"""The browser node's foundation in real Chromium against the real server.

One page load of /static/node/selftest.html runs the JS codecs and frames against the golden
vectors, then loads Pyodide, unpacks /pkg/shared.zip and runs `shared` on the same vectors
inside the tab. The other tests drive window.daa (the page's modules) for ML-DSA-65 and zstd
interop with the native Python implementations (pqcrypto, zstandard).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.envelope import Identity, verify_frame
from shared.errors import BadSignature
from shared.frame import FLAG_ZSTD, decode_frame
from shared.messages import Submit, decode_message, new_nonce, sha256_hex

TESTDATA = Path(__file__).resolve().parent.parent / "shared" / "testdata"
CODECS = json.loads((TESTDATA / "codecs.json").read_text(encoding="utf-8"))
FRAMES = json.loads((TESTDATA / "frames.json").read_text(encoding="utf-8"))
RUN = "run-e2e-7f3a"
PAGE_TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def page(browser: Any, live_server: Any) -> Iterator[Any]:
    """The self-test page, loaded once and run to the end (Pyodide included)."""
    context = browser.new_context()
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    t0 = time.monotonic()
    response = pg.goto(f"{live_server.url}/static/node/selftest.html")
    pg.wait_for_function("() => window.__results && window.__results.status !== 'running'",
                         timeout=PAGE_TIMEOUT_MS)
    pg.elapsed_s = time.monotonic() - t0
    pg.main_response = response
    results = pg.evaluate("() => window.__results")
    assert results["status"] == "done", (results.get("error"), errors)
    pg.results = results
    try:
        yield pg
    finally:
        context.close()


def _failed(checks: list[dict[str, Any]]) -> list[str]:
    return [f"{c['name']}: {c.get('error')}" for c in checks if not c["ok"]]


def test_page_is_cross_origin_isolated(page: Any) -> None:
    headers = page.main_response.headers
    assert headers["cross-origin-opener-policy"] == "same-origin"
    assert headers["cross-origin-embedder-policy"] == "require-corp"
    assert page.results["crossOriginIsolated"] is True
    assert page.evaluate("() => typeof SharedArrayBuffer") == "function"


def test_js_codecs_match_golden_vectors(page: Any) -> None:
    checks = page.results["js"]["codecs"]
    n_exact = sum(v["exact_encode"] for v in CODECS["valid"])
    assert len(checks) == len(CODECS["valid"]) + n_exact + len(CODECS["invalid"])
    assert _failed(checks) == []


def test_js_frames_match_golden_vectors(page: Any) -> None:
    checks = page.results["js"]["frames"]
    assert len(checks) == len(FRAMES["valid"]) + len(FRAMES["invalid"]) + len(
        FRAMES["signed"]["frames"])
    assert _failed(checks) == []


def test_shared_runs_in_pyodide(page: Any, live_server: Any) -> None:
    py = page.results["pyodide"]
    assert py["python"].startswith("3.13"), py["python"]
    assert py["in_browser"] is True
    assert py["numpy"] is False
    assert py["non_stdlib_modules"] == []
    assert _failed(py["checks"]) == []
    names = {c["name"] for c in py["checks"]}
    assert {f"py codec {v['name']}" for v in CODECS["valid"]} <= names
    assert len([n for n in names if n.startswith("py refuse ")]) == len(FRAMES["invalid"])
    # the tab's JS update encoder (shared.platform.UpdateEncoder) == shared.codecs
    assert {f"py update encoder {c} = shared.codecs" for c in
            ("raw32", "fp16", "bf16", "int8-block", "int4-block", "topk")} <= names
    # signed inside the tab (shared.envelope over noble ML-DSA): verifies natively
    s = FRAMES["signed"]
    frame = decode_frame(bytes.fromhex(py["signed_by_pyodide"]))
    verify_frame(frame, public_key=bytes.fromhex(s["public_key_hex"]), run_id=s["run_id"],
                 node_id=s["node_id"])
    with urllib.request.urlopen(f"{live_server.url}/pkg/shared.zip") as resp:
        assert py["zip_sha256"] == hashlib.sha256(resp.read()).hexdigest()
    print(f"\npage done in {page.elapsed_s:.1f} s; Pyodide runtime {py['runtime_ms']:.0f} ms, "
          f"shared {py['shared_ms']:.0f} ms, self-test {py['run_ms']:.0f} ms; "
          f"JS golden {page.results['js']['ms']:.0f} ms")


def test_shared_zip_headers(live_server: Any) -> None:
    with urllib.request.urlopen(f"{live_server.url}/pkg/shared.zip") as resp:
        body = resp.read()
        headers = resp.headers
    assert headers["X-Content-SHA256"] == hashlib.sha256(body).hexdigest()
    assert headers["ETag"] == f'"{headers["X-Content-SHA256"]}"'
    assert headers["Cache-Control"] == "no-cache"
    assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    names = zipfile.ZipFile(io.BytesIO(body)).namelist()
    assert "shared/__init__.py" in names
    assert "shared/testdata/frames.json" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    req = urllib.request.Request(f"{live_server.url}/pkg/shared.zip",
                                 headers={"If-None-Match": headers["ETag"]})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req)
    assert info.value.code == 304
    for path in ("/static/node/%2e%2e/%2e%2e/run.sh", "/static/vendor/..%2f..%2fnode%2fgolden.js",
                 "/pkg/testdata/make_golden.py"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{live_server.url}{path}")
        assert info.value.code == 404, path


def _submit(ident: Identity, payload: bytes, round_: int = 3) -> bytes:
    nonce = new_nonce()
    msg = Submit(run_id=RUN, round=round_, node_id=ident.node_id, nonce=nonce, codec="raw32",
                 length=(len(payload) - 1) // 4, digest=sha256_hex(payload), train_loss=0.75,
                 samples=4, compute_s=0.5, payload=payload)
    return msg.to_frame(sign=ident.signer(run_id=RUN, round_=round_, msg_type=Submit.TYPE,
                                          nonce=nonce))


VERIFY_JS = """([hex, pk, run, node]) => {
  const {frame, identity, floatbits} = window.daa;
  const f = frame.decodeFrame(floatbits.fromHex(hex));
  try {
    identity.verifyFrame(f, {publicKey: floatbits.fromHex(pk), runId: run, nodeId: node});
    return 'ok';
  } catch (exc) { return exc.code; }
}"""


def test_mldsa_python_signs_browser_verifies(page: Any) -> None:
    ident = Identity.generate()  # pqcrypto
    frame = _submit(ident, b"\x00" + bytes(16))
    args = [frame.hex(), ident.public_key.hex(), RUN, ident.node_id]
    assert page.evaluate(VERIFY_JS, args) == "ok"
    tampered = bytearray(frame)
    tampered[-1] ^= 0x01
    assert page.evaluate(VERIFY_JS, [tampered.hex(), *args[1:]]) == "bad_signature"
    assert page.evaluate(VERIFY_JS, [frame.hex(), args[1], "another-run", args[3]]) == (
        "bad_signature")


def test_mldsa_browser_signs_python_verifies(page: Any) -> None:
    out = page.evaluate("""async (run) => {
      const {identity, messages, floatbits} = window.daa;
      await identity.forgetIdentity('e2e');
      const me = await identity.loadOrCreateIdentity('e2e');
      const again = await identity.loadOrCreateIdentity('e2e');
      const payload = Uint8Array.of(0, 0, 0, 0x80, 0x3f);
      const digest = floatbits.toHex(
        new Uint8Array(await crypto.subtle.digest('SHA-256', payload)));
      const nonce = messages.newNonce();
      const fields = {run_id: run, round: 4, node_id: me.nodeId, nonce, codec: 'raw32',
        length: 1, digest, train_loss: null, samples: 2, compute_s: 0.25};
      const bytes = messages.encodeMessage('Submit', fields, payload, {
        sign: identity.signer(me, {runId: run, round: 4, msgType: 4, nonce})});
      return {hex: floatbits.toHex(bytes), pk: floatbits.toHex(me.publicKey),
              node: me.nodeId, stable: again.nodeId === me.nodeId};
    }""", RUN)
    assert out["stable"] is True
    data = bytes.fromhex(out["hex"])
    msg = decode_message(data)
    assert isinstance(msg, Submit)
    assert msg.node_id == out["node"]
    assert msg.payload[1:] == (
        b"\x00\x00\x80\x3f")
    verify_frame(decode_frame(data), public_key=bytes.fromhex(out["pk"]), run_id=RUN,
                 node_id=out["node"])
    with pytest.raises(BadSignature):
        verify_frame(decode_frame(data), public_key=bytes.fromhex(out["pk"]), run_id="other",
                     node_id=out["node"])


def test_identity_survives_a_reload(page: Any, live_server: Any) -> None:
    get_id = "async () => (await window.daa.identity.loadOrCreateIdentity('persist')).nodeId"
    first = page.evaluate(get_id)
    page.goto(f"{live_server.url}/static/node/selftest.html?nopy")  # a reload, minus Pyodide
    page.wait_for_function("() => window.__results && window.__results.status === 'done'",
                           timeout=PAGE_TIMEOUT_MS)  # later tests need the zstd encoder too
    assert page.evaluate(get_id) == first


def test_zstd_interop(page: Any) -> None:
    import zstandard

    data = bytes(random.Random(3).choices(range(8), k=20_000))
    packed = zstandard.ZstdCompressor(level=3).compress(data)
    out = page.evaluate("""([hex, n]) => {
      const {zstd, floatbits} = window.daa;
      const plain = zstd.decompress(floatbits.fromHex(hex), n);
      let refused = null;
      try { zstd.decompress(floatbits.fromHex(hex), n - 1); } catch (exc) { refused = exc.message; }
      const packed = floatbits.toHex(zstd.compress(plain));
      return {plain: floatbits.toHex(plain), packed, refused};
    }""", [packed.hex(), len(data)])
    assert bytes.fromhex(out["plain"]) == data
    assert "limit" in out["refused"]
    assert zstandard.ZstdDecompressor().decompress(bytes.fromhex(out["packed"])) == data
    # a compressed Submit frame from the tab decodes natively
    frame_hex = page.evaluate("""async (n) => {
      const {messages, zstd, floatbits} = window.daa;
      const payload = new Uint8Array(n);
      const digest = floatbits.toHex(
        new Uint8Array(await crypto.subtle.digest('SHA-256', payload)));
      return floatbits.toHex(messages.encodeMessage('Submit', {run_id: 'r', round: 0,
        node_id: 'ab'.repeat(32), nonce: messages.newNonce(), codec: 'raw32', length: (n - 1) / 4,
        digest, train_loss: null, samples: 1, compute_s: 0.5}, payload, {zstd: zstd.zstd}));
    }""", 4097)
    data = bytes.fromhex(frame_hex)
    assert decode_frame(data).flags & FLAG_ZSTD
    msg = decode_message(data)
    assert isinstance(msg, Submit)
    assert msg.payload == bytes(4097)


def test_codecs_differential_random_vectors(page: Any) -> None:
    """Larger random inputs than the golden file: JS encode/decode == Python's, byte for byte."""
    import numpy as np

    from shared.codecs import make_codec

    rng = np.random.default_rng(11)
    cases = []
    specs: list[tuple[str, dict[str, Any]]] = [
        ("fp16", {}), ("bf16", {}), ("int8-block", {"block": 256}),
        ("int8-block", {"mode": "minmax"}), ("int8-block", {"block": 100, "scale_dtype": "fp16"}),
        ("int4-block", {}), ("int4-block", {"mode": "minmax", "block": 33}),
        ("topk", {"fraction": 0.05}), ("topk", {"fraction": 0.1, "values": "fp16"})]
    for name, params in specs:
        x = (rng.standard_normal(20_001) * rng.choice([1e-4, 1.0, 300.0])).astype(np.float32)
        x[rng.integers(0, x.size, 50)] = 0.5  # ties
        payload = make_codec(name, **params).encode(x)
        decoded = make_codec(name, **params).decode(payload, x.size)
        cases.append({"name": name, "params": params, "x": x.tobytes().hex(),
                      "payload": payload.hex(), "decoded": np.asarray(decoded).tobytes().hex()})
    out = page.evaluate("""(cases) => {
      const {codecs, floatbits} = window.daa;
      return cases.map((c) => {
        const x = new Float32Array(floatbits.fromHex(c.x).buffer);
        const p = floatbits.toHex(codecs.encode(c.name, x, c.params));
        const d = codecs.decodeUpdate(floatbits.fromHex(c.payload), x.length, {expect: c.name});
        return [p === c.payload, floatbits.toHex(floatbits.bytesOf(d)) === c.decoded];
      });
    }""", cases)
    assert out == [[True, True]] * len(cases), [(c["name"], c["params"], o)
                                               for c, o in zip(cases, out, strict=True)]


def _raw_frame(msg_type: int, head: bytes, payload: bytes = b"", flags: int = 0) -> bytes:
    from shared.frame import FIXED_HEADER, MAGIC

    return FIXED_HEADER.pack(MAGIC, 1, msg_type, flags, len(head), len(payload)) + head + payload


def test_frame_edge_cases_refused_like_python(page: Any) -> None:
    """Beyond the golden file: JSON corner cases give the same verdict in JS as in Python."""
    from shared.errors import ProtocolError

    digest, nonce = "ab" * 32, "cd" * 16

    def head(obj: dict[str, Any], raw: str = "", *, sep: tuple[str, str] = (",", ":")) -> bytes:
        """JSON of `obj`, with the string "@RAW@" replaced by the literal `raw`."""
        return json.dumps(obj, separators=sep, ensure_ascii=False).replace('"@RAW@"', raw).encode()

    ack = {"digest": digest, "nonce": nonce, "round": "@RAW@", "status": "accepted"}
    candidate = {"digest": digest, "node_id": digest, "offset": "@RAW@", "size": 0}
    cases = {
        "round as float literal": _raw_frame(5, head(ack, "5.0")),
        "round as exponent": _raw_frame(5, head(ack, "5e0")),
        "round as int": _raw_frame(5, head(ack, "5")),
        "number out of range": _raw_frame(5, head(ack, "1e999")),
        "lone surrogate": _raw_frame(5, head({**ack, "digest": "@RAW@", "round": 5},
                                              '"\\ud800"')),
        "utf-8 BOM": _raw_frame(5, b"\xef\xbb\xbf" + head(ack, "5")),
        "overlong utf-8": _raw_frame(5, head(ack, "5").replace(b'"accepted"',
                                                               b'"acc\xc1\xa5pted"')),
        "spaces, unsorted keys": _raw_frame(5, head(
            {"status": "duplicate", "round": 2, "nonce": nonce, "digest": digest},
            sep=(", ", ": "))),
        "error nulls": _raw_frame(6, head({"code": "x", "field": None, "message": "m",
                                           "nonce": nonce, "round": None})),
        "signal to server": _raw_frame(11, head({"data": "", "kind": "bye", "node_id": "server",
                                                 "nonce": nonce, "run_id": "r", "to": digest})),
        "verdict null loss": _raw_frame(10, head({
            "base_loss": None, "node_id": digest, "nonce": nonce, "round": 1, "run_id": "r",
            "scores": [{"digest": digest, "loss": None, "node_id": digest}]})),
        "candidate offset as float": _raw_frame(9, head({
            "candidates": [candidate], "codec": "raw32", "length": 1, "nonce": nonce,
            "params_digest": digest, "round": 1, "run_id": "r"}, "0.0")),
        "bool for float": _raw_frame(7, head({"eval_loss": True, "final": False,
                                              "n_updates": 1, "nonce": nonce,
                                              "params_digest": digest, "round": 1})),
    }
    want = {}
    for name, data in cases.items():
        try:
            decode_message(data)
            want[name] = "ok"
        except ProtocolError as exc:
            want[name] = f"{exc.code}/{exc.field}"
    got = page.evaluate("""(cases) => {
      const {messages, floatbits} = window.daa;
      const out = {};
      for (const [name, hex] of Object.entries(cases)) {
        try { messages.decodeMessage(floatbits.fromHex(hex)); out[name] = 'ok'; }
        catch (exc) { out[name] = `${exc.code}/${exc.field}`; }
      }
      return out;
    }""", {name: data.hex() for name, data in cases.items()})
    assert got == want
    assert len(set(want.values())) >= 4, want  # a mix of verdicts, not all "ok"


# y = x * x + x over a float32 vector of any length (onnx.helper, opset 17, IR 8)
TINY_ONNX = ("080812076461612d6532653a470a0e0a01780a017812017422034d756c0a0e0a01740a017812017922"
             "034164641201675a100a0178120b0a09080112050a0312016e62100a0179120b0a09080112050a0312"
             "016e42040a001011")


def test_onnxruntime_web_runs_with_threads(page: Any) -> None:
    """The vendored ORT-web (wasm, 2 threads: needs the isolation headers) runs a graph."""
    out = page.evaluate("""async (hex) => {
      const ort = await import('onnxruntime-web');
      ort.env.wasm.wasmPaths = '/static/vendor/onnxruntime-web/';
      ort.env.wasm.numThreads = 2;
      const t0 = performance.now();
      const session = await ort.InferenceSession.create(window.daa.floatbits.fromHex(hex),
        {executionProviders: ['wasm']});
      const x = new ort.Tensor('float32', Float32Array.of(1, 2, -3, 0.5), [4]);
      const {y} = await session.run({x});
      return {y: Array.from(y.data), ms: performance.now() - t0, threads: ort.env.wasm.numThreads};
    }""", TINY_ONNX)
    assert out["y"] == [2.0, 6.0, 6.0, 0.75]
    assert out["threads"] == 2


def _kind(hint: Any) -> str:
    import types
    import typing

    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return _kind(next(a for a in args if a is not type(None))) + "?"
    origin = typing.get_origin(hint) or hint
    return {str: "s", int: "i", float: "f", bool: "b", dict: "d", list: "l",
            bytes: "payload"}[origin]


def test_js_message_schemas_match_python(page: Any) -> None:
    """messages.js repeats shared/messages.py's fields: same names, order and types."""
    import typing
    from dataclasses import fields

    from shared.messages import MESSAGE_TYPES

    want = {}
    for type_id, cls in MESSAGE_TYPES.items():
        hints = typing.get_type_hints(cls)
        want[str(type_id)] = [cls.__name__, [[f.name, _kind(hints[f.name])]
                                             for f in fields(cls)]]  # type: ignore[arg-type]
    got = page.evaluate("""() => Object.fromEntries(Object.entries(window.daa.messages.SCHEMAS)
      .map(([id, [name, schema]]) => [id, [name, Object.entries(schema)]]))""")
    assert got == want, "browser/node/messages.js is out of step with shared/messages.py"
