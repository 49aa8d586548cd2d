"""Which nodes of an ONNX graph quantization touches: MatMul / Gemm whose B is a 2-D float weight.

Calibration observes their activation inputs, static int8 puts Q/DQ around them, int4 rewrites
them to MatMulNBits. Attention-score MatMuls (both inputs computed) are not weight layers and stay
fp32 in every scheme here.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from kiln.errors import StepError

FLOAT = onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class WeightLayer:
    node: onnx.NodeProto
    activation: str  # the computed input A
    weight: str  # the initializer B
    transposed: bool  # Gemm transB = 1: B is [N, K]
    bias: str | None  # Gemm C, when it is a 1-D initializer


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def weight_layers(model: onnx.ModelProto, op_types=("MatMul", "Gemm")) -> list[WeightLayer]:
    """Nodes computing A @ W (+ bias) with W a 2-D float32 initializer, in graph order. A Gemm with
    transA, alpha != 1, beta != 1 or a bias that is not a 1-D initializer is not such a layer."""
    inits = {t.name: t for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type not in op_types or len(node.input) < 2:
            continue
        a, b = node.input[0], node.input[1]
        w = inits.get(b)
        if a in inits or w is None or w.data_type != FLOAT or len(w.dims) != 2:
            continue
        bias = None
        if node.op_type == "Gemm":
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
                continue
            if len(node.input) > 2 and node.input[2]:
                c = inits.get(node.input[2])
                if c is None or c.data_type != FLOAT or len(c.dims) != 1:
                    continue
                bias = c.name
        layers.append(WeightLayer(node, a, b, bool(_attr(node, "transB", 0)) if node.op_type == "Gemm" else False, bias))
    return layers


def layers_to_quantize(model: onnx.ModelProto, exclude: list[str], step: str, op_types=("MatMul", "Gemm")) -> list[WeightLayer]:
    """The weight layers a quantizer rewrites: every one but the nodes named in exclude_nodes.
    Nameless nodes are named <op_type>_<index> first (quantizers address nodes by name; "" would match
    them all). An excluded name that is no node of the graph fails the step, listing what can be."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    layers = weight_layers(model, op_types)
    known = {node.name for node in model.graph.node}
    unknown = [name for name in exclude if name not in known]
    if unknown:
        names = [layer.node.name for layer in weight_layers(model)]
        shown = ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")
        raise StepError(step, f"options.exclude_nodes: {unknown[0]!r} is not a node of the model; weight layers it can exclude: {shown}")
    return [layer for layer in layers if layer.node.name not in exclude]


def with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    """The model (changed in place) with float tensors `names` added as graph outputs, serialized for
    an onnxruntime session: how calibration reads activations without keeping a second model around."""
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, FLOAT, None) for n in names if n not in present)
    return model.SerializeToString()
