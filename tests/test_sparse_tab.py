"""The tab's SparseLoCo step (browser/node/sparse_step.js, codec_int2.js) against the server's
numpy step, under Node.js: the golden vectors of shared/testdata/sparse_step.json, a larger
differential over rounds, refusals that leave the params untouched; and the Python side the
tab runs without numpy (shared.platform's stepper, shared.open_kinds' counts and feature)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import shared.open_kinds as open_kinds
import shared.sparseloco as sparseloco
from shared import platform
from shared.downlink import encode_changes, resolve
from shared.errors import BadUpdate
from shared.messages import sha256_hex
from shared.open_kinds import OpenKinds, kind_of, sparse_features
from shared.overlap import merge
from shared.sparseloco import FEATURE, SparseOuter, server_step

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "js" / "sparse_step_node.mjs"
GOLDEN = ROOT / "shared" / "testdata" / "sparse_step.json"


def run_js(doc: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    path = tmp_path / "case.json"
    path.write_text(json.dumps({"int2": [], "steps": [], "invalid": [], **doc}))
    proc = subprocess.run([node, str(RUNNER), str(path)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def test_js_matches_the_golden_vectors(tmp_path: Path) -> None:
    doc = json.loads(GOLDEN.read_text(encoding="utf-8"))
    got = run_js(doc, tmp_path)
    assert len(got["int2"]) == len(doc["int2"]) >= 5
    for want, have in zip(doc["int2"], got["int2"], strict=True):
        assert have["payload"] == want["payload_hex"], want["name"]  # the same 2-bit bytes
        assert have["decoded"] == want["decoded_hex"], want["name"]
    assert len(got["steps"]) == len(doc["steps"]) >= 5
    for want, have in zip(doc["steps"], got["steps"], strict=True):
        assert have["thetas"] == want["thetas_hex"], want["name"]  # every round, bit for bit
    assert len(got["invalid"]) == len(doc["invalid"]) >= 8
    for case in got["invalid"]:
        assert str(case["error"]).startswith("BadUpdate"), case
        assert case["untouched"], case  # decoded before anything is written


def test_golden_file_is_current() -> None:
    proc = subprocess.run([sys.executable, str(GOLDEN.with_name("make_sparse_golden.py")),
                           "--check"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, "run shared/testdata/make_sparse_golden.py: the file is stale"


def test_js_follows_the_server_over_rounds_on_a_larger_vector(tmp_path: Path) -> None:
    """200k params, 4 rounds of the server's plain and Nesterov steps (4% int2, lr 1 and 0.7):
    the JS chain ends on the server's bytes, hence its params digest."""
    rng = np.random.default_rng(160)
    n = 200_003
    steps, want = [], []
    for cfg in (SparseOuter(lr=1.0), SparseOuter(lr=0.7, momentum=0.3, block=100)):
        theta = (rng.standard_normal(n) * 0.05).astype(np.float32)
        start = theta.copy()
        state = np.zeros(2 * n if cfg.momentum else n, np.float32)
        payloads = []
        for _ in range(4):
            grad = (rng.standard_normal(n) * 1e-3).astype(np.float32)
            theta, state, payload = server_step(theta, grad, state, cfg)
            payloads.append(payload.hex())
        steps.append({"name": f"m{cfg.momentum}", "n": n, "theta_hex": start.tobytes().hex(),
                      "payloads_hex": payloads})
        want.append(sha256_hex(theta.tobytes()))
    got = run_js({"steps": steps}, tmp_path)["steps"]
    assert [sha256_hex(bytes.fromhex(s["thetas"][-1])) for s in got] == want


class NodeStepper:
    """shared.platform.SparseStepper over sparse_step.js under Node.js: the tab's path."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path, self.calls = tmp_path, 0

    def step(self, theta: bytes, payload: bytes) -> bytes:
        self.calls += 1
        got = run_js({"steps": [{"name": "x", "n": len(theta) // 4, "theta_hex": theta.hex(),
                                 "payloads_hex": [payload.hex()]}]}, self.tmp_path)
        return bytes.fromhex(got["steps"][0]["thetas"][0])


def test_without_numpy_the_registered_stepper_resolves_and_the_feature_follows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    n = 5000
    theta = rng.standard_normal(n).astype(np.float32)
    new, _, payload = server_step(theta, rng.standard_normal(n).astype(np.float32) * 0.01,
                                  np.zeros(n, np.float32), SparseOuter(lr=0.8))
    # shared.sparseloco as it runs in Pyodide: no numpy (the rest of the test keeps it)
    monkeypatch.setattr(sparseloco, "numpy_module", lambda: None)
    monkeypatch.setattr(platform, "_sparse_stepper", None)
    assert sparse_features() == ()  # no numpy, no JS: the Hello must not say it
    with pytest.raises(BadUpdate):
        sparseloco.resolve_step(np.zeros(8, np.float32), b"DL\x03" + bytes(20))
    stepper = NodeStepper(tmp_path)
    platform.register_sparse_stepper(stepper)
    assert sparse_features() == (FEATURE,)
    msg = SimpleNamespace(base_digest=sha256_hex(theta.tobytes()), payload=payload,
                          params_digest=sha256_hex(new.tobytes()))
    kinds = OpenKinds(resolve)
    got = kinds(msg, theta, msg.base_digest)  # the participant's resolver, digest checked
    assert bytes(memoryview(got).cast("B")) == new.tobytes()
    assert stepper.calls == 1
    assert kinds.counts == {"full": 0, "delta": 0, "sparse": 1, "outer": 0, "resyncs": 0}
    bad = SimpleNamespace(**{**vars(msg), "params_digest": "0" * 64})  # another server's
    with pytest.raises(BadUpdate):
        kinds(bad, theta, msg.base_digest)
    assert (kinds.counts["resyncs"], kinds.counts["sparse"]) == (1, 1)


def test_open_kinds_counts_each_kind() -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal(100).astype(np.float32)
    b = a.copy()
    b[[3, 50]] += 1.0
    d_a, d_b = sha256_hex(a.tobytes()), sha256_hex(b.tobytes())
    full = SimpleNamespace(base_digest=None, payload=a.tobytes(), params_digest=d_a)
    delta = SimpleNamespace(base_digest=d_a, payload=encode_changes(a, b), params_digest=d_b)
    missed = SimpleNamespace(base_digest=d_b, payload=encode_changes(b, a), params_digest=d_a)
    part = SimpleNamespace(resolver=resolve)
    kinds = OpenKinds.watch(part)
    assert part.resolver is kinds
    held = part.resolver(full, None, None)
    held = part.resolver(delta, held, d_a)
    with pytest.raises(BadUpdate):
        part.resolver(missed, held, d_a)  # a base this node does not hold: it resyncs
    assert kinds.counts == {"full": 1, "delta": 1, "sparse": 0, "outer": 0, "resyncs": 1}
    assert [kind_of(m) for m in (full, delta)] == ["full", "delta"]
    assert open_kinds.KINDS == ("full", "delta", "sparse", "outer")


def test_js_overlap_merge_is_shared_overlap_merge(tmp_path: Path) -> None:
    """The tab's merge of steps run ahead (browser/node/ahead.js) gives the float32 bits of
    shared.overlap.merge, the native nodes' and the simulator's."""
    rng = np.random.default_rng(6)
    cases, want = [], []
    for n in (1, 7, 50_001):
        t, loc, st = ((rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3, n)).astype(
            np.float32) for _ in range(3))
        t[0], loc[0], st[0] = -0.0, 1e-30, 1e-30  # -0 + (x - x): +0 in both
        cases.append({"theta": t.tobytes().hex(), "local": loc.tobytes().hex(),
                      "start": st.tobytes().hex()})
        want.append(np.asarray(merge(t, loc, st), dtype="<f4").tobytes().hex())
    assert run_js({"merge": cases}, tmp_path)["merge"] == want
