"""Cap the fan-out of Split and the fan-in of Concat in an exported graph, exactly.

The flat parameter vector is split into every tensor of the model (and the gradient
concatenated back) by ONE Split / Concat with a port per tensor: 30 for gpt-tiny. ONNX Runtime
Web's WebGPU execution provider binds one storage buffer per port, and WebGPU guarantees only
8 per shader stage (`maxStorageBuffersPerShaderStage`): on such an adapter the op silently
writes zeros (measured: gpt-tiny's logits all 0 on SwiftShader; mlp-digits, 4 tensors, exact).

`limit_fan(model, max_fan)` rewrites each such node into a tree of nodes with at most
`max_fan` outputs (Split) or inputs (Concat) each: contiguous groups first, then each group.
Split and Concat copy values, so the graph computes bit-identical results.
"""

from __future__ import annotations

from typing import Any

MAX_FAN = 4


def _groups(n: int, max_fan: int) -> list[range]:
    """Split range(n) into at most max_fan contiguous, near-equal groups."""
    k = min(max_fan, n)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(k)]


class _FanRewriter:
    """Builds the Split / Concat trees of one graph, with fresh names and size initializers."""

    def __init__(self, graph: Any, max_fan: int) -> None:
        from onnx import helper

        self.graph, self.max_fan, self.counter = graph, max_fan, 0
        self.inits = {t.name: t for t in graph.initializer}
        self.consts: dict[str, Any] = {
            node.output[0]: helper.get_attribute_value(node.attribute[0])
            for node in graph.node if node.op_type == "Constant" and node.attribute}

    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}__fan{self.counter}"

    def sizes_of(self, name: str) -> list[int] | None:
        from onnx import numpy_helper

        t = self.inits.get(name) or self.consts.get(name)
        return None if t is None else [int(v) for v in numpy_helper.to_array(t).ravel()]

    def split_tree(self, src: str, sizes: list[int], outs: list[str], axis: int, base: str,
                   acc: list[Any]) -> None:
        import numpy as np
        from onnx import helper, numpy_helper

        if len(outs) <= self.max_fan:
            const = self.fresh(base + "_sizes")
            self.graph.initializer.append(
                numpy_helper.from_array(np.asarray(sizes, np.int64), const))
            acc.append(helper.make_node("Split", [src, const], outs, axis=axis,
                                        name=self.fresh(base)))
            return
        groups = _groups(len(outs), self.max_fan)
        mids = [outs[g[0]] if len(g) == 1 else self.fresh(base + "_part") for g in groups]
        self.split_tree(src, [sum(sizes[i] for i in g) for g in groups], mids, axis, base, acc)
        for g, mid in zip(groups, mids, strict=True):
            if len(g) > 1:
                self.split_tree(mid, [sizes[i] for i in g], [outs[i] for i in g], axis, base,
                                acc)

    def concat_tree(self, ins: list[str], out: str, axis: int, base: str,
                    acc: list[Any]) -> None:
        from onnx import helper

        if len(ins) <= self.max_fan:
            acc.append(helper.make_node("Concat", ins, [out], axis=axis, name=self.fresh(base)))
            return
        mids = []
        for g in _groups(len(ins), self.max_fan):
            if len(g) == 1:
                mids.append(ins[g[0]])
            else:
                mid = self.fresh(base + "_part")
                self.concat_tree([ins[i] for i in g], mid, axis, base, acc)
                mids.append(mid)
        self.concat_tree(mids, out, axis, base, acc)

    def rewrite(self, node: Any, acc: list[Any]) -> bool:
        """Append `node`'s tree to `acc` and return True, or False if it stays as it is."""
        from onnx import helper

        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axis = int(attrs.get("axis", 0))
        if node.op_type == "Split" and len(node.output) > self.max_fan \
                and len(node.input) == 2:
            sizes = self.sizes_of(node.input[1])
            if sizes is None or len(sizes) != len(node.output):
                return False
            self.split_tree(node.input[0], sizes, list(node.output), axis,
                            node.name or "split", acc)
            return True
        if node.op_type == "Concat" and len(node.input) > self.max_fan:
            self.concat_tree(list(node.input), node.output[0], axis, node.name or "concat", acc)
            return True
        return False


def limit_fan(model: Any, max_fan: int = MAX_FAN) -> int:
    """Rewrite in place; returns the number of nodes replaced."""
    graph = model.graph
    rewriter = _FanRewriter(graph, max_fan)
    new_nodes: list[Any] = []
    replaced = 0
    for node in graph.node:
        if rewriter.rewrite(node, new_nodes):
            replaced += 1
        else:
            new_nodes.append(node)
    if replaced:
        del graph.node[:]
        graph.node.extend(new_nodes)
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return replaced
