"""The tab's training limit in Python (ml.tab_limits) is node.js's, and a model over it gets
no train-step export: its manifest says why, the inference graph is still there."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ml import tab_limits

ROOT = Path(__file__).resolve().parent.parent


def test_the_limit_is_node_js_limit() -> None:
    text = (ROOT / "browser/node/node.js").read_text(encoding="utf-8")
    m = re.search(r"TAB_STATE_BYTES = 2 \*\* (\d+);", text)
    assert m is not None
    assert 2 ** int(m.group(1)) == tab_limits.TAB_STATE_BYTES
    assert "const need = 7 * 4 * manifest.n_params;" in text
    assert tab_limits.train_unavailable(76_695_844) is None  # 2 GiB - 16 bytes
    assert tab_limits.train_unavailable(122_728_704) is not None  # llama 125m


def test_the_reason_is_the_one_the_tab_gives() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed")
    ns = [76_695_845, 122_728_704, 1_000_000_000]
    script = ("import('./browser/node/node.js').then((m) => console.log(JSON.stringify("
              f"{ns}.map((n) => m.trainUnavailable({{n_params: n}})))))")
    out = subprocess.run([node, "--input-type=module", "-e", script], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == [tab_limits.train_unavailable(n) for n in ns]


def test_a_model_no_tab_can_train_exports_inference_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ml.onnx_export import export_graphs
    from ml.zoo import model_config

    monkeypatch.setattr(tab_limits, "TAB_STATE_BYTES", 7 * 4 * 1000)  # mlp-digits: 9,610
    graphs = export_graphs(model_config("mlp-digits"), tmp_path)
    assert graphs.manifest["train_unavailable"] == tab_limits.train_unavailable(9610)
    assert graphs.manifest["train_unavailable"]["reason"] == "too_large"
    assert set(graphs.manifest["graphs"]) == {"infer"}
    assert graphs.infer.exists()
    assert not graphs.train_step.exists()
