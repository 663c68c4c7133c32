"""Layer outputs of an ONNX model: a copy of the model with every intermediate node output
exposed as a graph output, run beside the real one.

torch's exporters keep each node's module scope: the TorchScript exporter in node names
(``/down_blocks.0/resnets.0/conv1/Conv``), the dynamo exporter in node metadata
(``pkg.torch.onnx.name_scopes``). So each scope's last node output is named after the torch
module it comes from (``down_blocks.0.resnets.0.conv1``) and matches the torch reference's
layer by name. A graph without scopes keeps the ONNX tensor names; comparison then matches
layers by position where count and shapes agree, and says so.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any

from alignkit.errors import require


@dataclass
class ExposedModel:
    session: Any  # onnxruntime.InferenceSession of the copy
    graph_outputs: list[str]
    layers: list[tuple[str, str]]  # (layer name, ONNX tensor name) in graph order

    def run(self, feed: dict[str, Any]) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        """Run the copy: (graph outputs, layer outputs), each as (name, array)."""
        names = self.graph_outputs + [onnx_name for _, onnx_name in self.layers if onnx_name not in self.graph_outputs]
        values = dict(zip(names, self.session.run(names, feed)))
        return [(n, values[n]) for n in self.graph_outputs], [
            (layer, values[onnx_name]) for layer, onnx_name in self.layers
        ]


def expose(model_path: str, pattern: re.Pattern | None = None, providers: list[str] | None = None) -> ExposedModel:
    onnx = require("onnx", "onnx")
    ort = require("onnxruntime", "onnx")
    model = onnx.load(model_path)
    typed = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    graph_outputs = [o.name for o in model.graph.output]
    layers = layer_names(model.graph.node, set(typed) | set(graph_outputs), pattern)
    for _, name in layers:
        if name not in graph_outputs:
            model.graph.output.append(typed[name])
    session = ort.InferenceSession(model.SerializeToString(), providers=providers or ["CPUExecutionProvider"])
    return ExposedModel(session, graph_outputs, layers)


def layer_names(nodes: Any, available: set[str], pattern: re.Pattern | None = None) -> list[tuple[str, str]]:
    """(layer name, tensor name): each module's output — the last output of its scope and of
    the scopes within it, as the torch module's own output is its last child's or its inline
    code's — in the order they complete (children before their block); or every output."""
    nodes = list(nodes)
    chains = [scope_chain(node) for node in nodes]
    scopes = {name for chain in chains for name in chain}
    by_scope: dict[str, str] = {}
    for node, chain in zip(nodes, chains):
        for prefix in reversed(chain):  # the scope itself, then each block around it
            for out in node.output:
                if out in available:
                    by_scope.pop(prefix, None)  # keep the order of each scope's last output
                    by_scope[prefix] = out
    pairs = [(torch_name(scope, scopes), out) for scope, out in by_scope.items()]
    if not pairs:
        pairs = [(out, out) for node in nodes for out in node.output if out in available]
    return [(layer, name) for layer, name in pairs if pattern is None or pattern.search(layer)]


_REPEAT = re.compile(r"^(?P<base>.+)_(?P<k>\d+)$")


def torch_name(scope: str, scopes: set[str]) -> str:
    """The torch layer name of an exported scope: a module called again in one forward is
    ``nonlinearity_1`` to the TorchScript exporter and ``nonlinearity#2`` to alignkit."""
    head, _, last = scope.rpartition(".")
    m = _REPEAT.match(last)
    if m is None:
        return scope
    base = f"{head}.{m.group('base')}" if head else m.group("base")
    return f"{base}#{int(m.group('k')) + 1}" if base in scopes else scope


_DYNAMO_SCOPES = "pkg.torch.onnx.name_scopes"  # ['', 'down_blocks.0', 'down_blocks.0.resnets.0', …, '<op>']


def scope_chain(node: Any) -> list[str]:
    """The torch modules a node was exported from, outermost first, each as its dotted path
    (``["down_blocks.0", "down_blocks.0.resnets.0", "down_blocks.0.resnets.0.conv1"]``); empty
    at the top level."""
    for prop in node.metadata_props:
        if prop.key == _DYNAMO_SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(s) for s in scopes[1:-1]] if isinstance(scopes, list) else []
    parts = [p for p in node.name.split("/") if p]  # TorchScript: /down_blocks.0/resnets.0/conv1/Conv
    if not node.name.startswith("/") or len(parts) < 2:
        return []
    return [".".join(parts[:depth]) for depth in range(1, len(parts))]


_QUANTIZED_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "MatMulNBits"}


def onnx_precision(model_path: str) -> str | None:
    """What an ONNX model computes in, read from its graph: ``int8`` when it holds quantized
    operators (QuantizeLinear, DynamicQuantizeLinear, MatMulInteger, QLinear*…), ``fp16`` or
    ``bf16`` when its weights or casts are of that type (a model converted with
    ``keep_io_types=True`` hides it behind float32 inputs and outputs), else ``fp32``. None when
    the file cannot be read."""
    try:
        import onnx
        from onnx import TensorProto

        model = onnx.load(model_path, load_external_data=False)
    except Exception:  # no onnx installed, or not a file it reads: say nothing
        return None
    nodes = list(model.graph.node)
    if any(n.op_type in _QUANTIZED_OPS or n.op_type.startswith("QLinear") for n in nodes):
        return "int8"
    types = {init.data_type for init in model.graph.initializer}
    types |= {a.i for n in nodes if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    if TensorProto.FLOAT16 in types:
        return "fp16"
    if TensorProto.BFLOAT16 in types:
        return "bf16"
    return "fp32"
