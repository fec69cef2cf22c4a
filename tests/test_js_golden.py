"""The browser tab's JS twins of the protocol code, checked under Node.js (no browser needed).

The tab decodes updates with browser/node/codecs.js and the self-test page checks
frame.js/messages.js; their Python originals are shared.codecs, shared.frame and
shared.messages. Here `node` runs tests/js/golden_node.mjs, which imports those same
browser/node/*.js modules and the same checker the self-test page runs (golden.js), so a
drift between the JS and the Python fails wherever Node.js is installed (Chromium or not):

* every golden vector of shared/testdata/ (codecs.json, frames.json);
* a differential: frames of every message type in shared.messages.MESSAGE_TYPES, with each
  field replaced by awkward values, get the same verdict ('ok' or code/field) in JS as in
  Python;
* messages.js's generated block equals scripts/gen_messages_js.py's output (no node needed).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.fuzz_frames import example_messages
from shared import messages as messages_module
from shared.errors import ProtocolError
from shared.frame import FIXED_HEADER, MAGIC, PROTOCOL_VERSION, canonical_json
from shared.messages import MAX_TEXT, MESSAGE_TYPES, Message, decode_message
from tests.test_messages import ALL, header_of

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "js" / "golden_node.mjs"
TESTDATA = ROOT / "shared" / "testdata"
CODECS = json.loads((TESTDATA / "codecs.json").read_text(encoding="utf-8"))
FRAMES = json.loads((TESTDATA / "frames.json").read_text(encoding="utf-8"))
JSON_SOURCE_FLAG = "--harmony-json-parse-with-source"  # Node 20: float literals seen as such


@functools.cache
def _node_argv() -> list[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    probe = subprocess.run([node, JSON_SOURCE_FLAG, "-e", "0"], capture_output=True,
                           timeout=60, check=False)
    return [node, JSON_SOURCE_FLAG] if probe.returncode == 0 else [node]


def _run_node(*args: str, stdin: str | None = None) -> Any:
    proc = subprocess.run([*_node_argv(), str(RUNNER), *args], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    out: dict[str, Any] = _run_node("golden", str(TESTDATA))
    return out


def _failed(checks: list[dict[str, Any]]) -> list[str]:
    return [f"{c['name']}: {c.get('error')}" for c in checks if not c["ok"]]


def test_js_codecs_match_golden_vectors(golden: dict[str, Any]) -> None:
    checks = golden["codecs"]
    n_exact = sum(v["exact_encode"] for v in CODECS["valid"])
    assert len(checks) == len(CODECS["valid"]) + n_exact + len(CODECS["invalid"])
    assert _failed(checks) == []


def test_js_frames_match_golden_vectors(golden: dict[str, Any]) -> None:
    checks = golden["frames"]
    assert len(checks) == len(FRAMES["valid"]) + len(FRAMES["invalid"]) + len(
        FRAMES["signed"]["frames"])
    assert _failed(checks) == []
    assert {v["msg_type"] for v in FRAMES["valid"]} == set(MESSAGE_TYPES)


# -- differential: every message type, every field, awkward values -------------------------
def _texts() -> list[str]:
    """Every enum value and name shared.messages defines (ROLES, TRANSPORTS, SERVER, ...)."""
    out: list[str] = []
    for name, value in vars(messages_module).items():
        if name.isupper() and isinstance(value, str):
            out.append(value)
        elif name.isupper() and isinstance(value, tuple):
            out += [v for v in value if isinstance(v, str)]
    return out


VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2, 3, -0.5, 0.0, -0.0, 0.5, 0.999, 1.0, 5.0, 1e-7, 1e308,
    2**31, 2**53, 2**53 + 1, 2**63, 2**64, -(2**64), "", "x", "0" * 64, "ab" * 32, "AB" * 32,
    "ab" * 16, "ab" * 63, "g" * 64, "x" * MAX_TEXT, "x" * (MAX_TEXT + 1), "\u00e9\u2603",
    *_texts(), [], [{}], [1], {}, {"a": None},
]


def _frame(msg_type: int, header: dict[str, Any], payload: bytes) -> bytes:
    head = canonical_json(header)
    return FIXED_HEADER.pack(MAGIC, PROTOCOL_VERSION, msg_type, 0, len(head),
                             len(payload)) + head + payload


def _cases() -> Iterator[tuple[str, bytes]]:
    samples: list[Message] = [*ALL, *example_messages().values()]
    for i, msg in enumerate(samples):
        label = f"{type(msg).__name__}#{i}"
        header, payload = header_of(msg), getattr(msg, "payload", b"")
        yield f"{label} as is", _frame(msg.TYPE, header, payload)
        for other in (0, max(MESSAGE_TYPES) + 1):
            yield f"{label} as type {other}", _frame(other, header, payload)
        for p in (b"", b"\0" * 3, b"\0" * 4, payload + b"\0" * 4):
            yield f"{label} payload {len(p)} bytes", _frame(msg.TYPE, header, p)
        yield f"{label} extra field", _frame(msg.TYPE, {**header, "zzz": 1}, payload)
        for name in header:
            rest = {k: v for k, v in header.items() if k != name}
            yield f"{label} without {name}", _frame(msg.TYPE, rest, payload)
            for value in VALUES:
                yield (f"{label}.{name} = {str(value)[:30]!r}",
                       _frame(msg.TYPE, {**header, name: value}, payload))
            entries = header[name]
            if isinstance(entries, list) and entries and isinstance(entries[0], dict):
                for key in entries[0]:
                    for value in VALUES:
                        bad = [{**entries[0], key: value}, *entries[1:]]
                        yield (f"{label}.{name}[0].{key} = {str(value)[:30]!r}",
                               _frame(msg.TYPE, {**header, name: bad}, payload))


def _python_verdict(data: bytes) -> str:
    try:
        decode_message(data)
    except ProtocolError as exc:
        return f"{exc.code}/{exc.field}".replace("/None", "/null")
    return "ok"


def test_js_decodes_every_message_type_like_python(golden: dict[str, Any]) -> None:
    if not golden["jsonSource"]:
        pytest.skip("this node's JSON.parse gives no source text (float literals look like ints)")
    cases = dict(_cases())
    assert {data[5] for data in cases.values()} >= set(MESSAGE_TYPES)
    got = _run_node("verdicts", stdin=json.dumps([d.hex() for d in cases.values()]))
    want = [_python_verdict(d) for d in cases.values()]
    assert len(got) == len(want) == len(cases)
    differ = [f"{name}: python {w}, js {g}"
              for name, w, g in zip(cases, want, got, strict=True) if w != g]
    assert differ == [], f"{len(differ)} of {len(cases)} differ:\n" + "\n".join(differ[:40])
    assert len(set(want)) > 10, "a mix of verdicts expected"
    assert want.count("ok") > len(ALL), "a mix of verdicts expected"


# -- the generated part of messages.js ------------------------------------------------------
def _generator() -> Any:
    path = ROOT / "scripts" / "gen_messages_js.py"
    spec = importlib.util.spec_from_file_location("gen_messages_js", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_messages_js_is_generated_from_the_dataclasses() -> None:
    gen = _generator()
    current = gen.TARGET.read_text(encoding="utf-8")
    assert gen.render(current) == current, "run: python3 scripts/gen_messages_js.py"
    block = gen.generated_block()
    for type_id, cls in MESSAGE_TYPES.items():
        assert f"  {type_id}: ['{cls.__name__}', {{" in block


def _non_canonical_cases() -> Iterator[tuple[str, bytes]]:
    """Other spellings of valid headers: shared.frame refuses all but the canonical one."""
    for msg in example_messages().values():
        label = type(msg).__name__
        header, payload = header_of(msg), getattr(msg, "payload", b"")
        head = canonical_json(header)
        spaced = json.dumps(header, sort_keys=True, ensure_ascii=False).encode()
        unsorted = json.dumps(dict(reversed(header.items())), separators=(",", ":"),
                              ensure_ascii=False).encode()
        key = sorted(header)[-1]
        dup = head[:-1] + b"," + json.dumps(key).encode() + b":" + json.dumps(
            header[key]).encode() + b"}"
        escaped = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        for name, raw in (("spaces", spaced), ("unsorted keys", unsorted),
                          ("duplicate key", dup), ("ascii escapes", escaped),
                          ("as is", head)):
            if name == "as is" or raw != head:
                yield f"{label} {name}", FIXED_HEADER.pack(
                    MAGIC, PROTOCOL_VERSION, msg.TYPE, 0, len(raw), len(payload)) + raw + payload


def test_js_refuses_non_canonical_headers_like_python(golden: dict[str, Any]) -> None:
    cases = dict(_non_canonical_cases())
    got = _run_node("verdicts", stdin=json.dumps([d.hex() for d in cases.values()]))
    want = [_python_verdict(d) for d in cases.values()]
    differ = [f"{name}: python {w}, js {g}"
              for name, w, g in zip(cases, want, got, strict=True) if w != g]
    assert differ == [], f"{len(differ)} of {len(cases)} differ:\n" + "\n".join(differ[:40])
