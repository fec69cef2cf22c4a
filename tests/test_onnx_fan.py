"""ml/onnx_fan.py: wide Split / Concat become trees of narrow ones, bit-identically."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ml.onnx_fan import limit_fan


def wide_graph(sizes: list[int]) -> onnx.ModelProto:
    """x [N] -> Split into len(sizes) parts -> each * 2 -> Concat -> y [N]; parts[3] too."""
    n = sum(sizes)
    parts = [f"p{i}" for i in range(len(sizes))]
    doubled = [f"d{i}" for i in range(len(sizes))]
    nodes = [helper.make_node("Split", ["x", "sizes"], parts, axis=0, name="split")]
    nodes += [helper.make_node("Mul", [p, "two"], [d]) for p, d in zip(parts, doubled, strict=True)]
    nodes.append(helper.make_node("Concat", doubled, ["y"], axis=0, name="concat"))
    graph = helper.make_graph(
        nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n]),
         helper.make_tensor_value_info("p3", TensorProto.FLOAT, [sizes[3]])],
        [numpy_helper.from_array(np.asarray(sizes, np.int64), "sizes"),
         numpy_helper.from_array(np.asarray(2.0, np.float32), "two")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in sess.run(None, {"x": x})]


@pytest.mark.parametrize("max_fan", [2, 3, 4])
def test_rewrite_is_exact_and_narrow(max_fan: int) -> None:
    sizes = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2]
    model = wide_graph(sizes)
    x = np.random.default_rng(0).standard_normal(sum(sizes)).astype(np.float32)
    want = run(model, x)
    assert limit_fan(model, max_fan) == 2
    onnx.checker.check_model(model)
    for node in model.graph.node:
        assert len(node.output) <= max_fan
        assert len(node.input) <= max_fan + (node.op_type == "Split")  # + the sizes input
    assert "sizes" not in {t.name for t in model.graph.initializer}  # the old one is dropped
    got = run(model, x)
    for a, b in zip(got, want, strict=True):
        assert a.tobytes() == b.tobytes()


def test_narrow_nodes_are_left_alone() -> None:
    model = wide_graph([2, 2, 2, 2])
    before = model.SerializeToString()
    assert limit_fan(model, 4) == 0
    assert model.SerializeToString() == before
