"""quantize_int4: fp32 ONNX -> 4-bit weight-only model. Every weight layer (MatMul / Gemm with a 2-D
float initializer B, see kiln.runtime.onnx_graph) becomes one com.microsoft MatMulNBits node (bits = 4)
whose packed weights, per-block scales and zero points come from kiln's native blockwise kernel
(kiln.native.repack.quantize_int4, the same bytes as onnxruntime's own quantizer but several times faster).
A Gemm's bias moves to MatMulNBits' bias input. Activations stay fp32 at the graph level;
accuracy_level 4 lets onnxruntime's CPU kernel quantize them to int8 blockwise inside the matmul.
onnxruntime's MatMulNBitsQuantizer skips Gemm (most of a BERT after onnxsim), hence kiln's rewrite.
A model with no weight layer left to rewrite fails the step (an fp32 model is never published as
int4), naming the weight ops it does have; the written file passes onnx's full checker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import StepError
from kiln.rules import Params, Rule, RunContext, register

MS_DOMAIN = "com.microsoft"


class QuantizeInt4Params(Params):
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    exclude_nodes: list[str] = []
    external_data: bool = False  # the model and the "data" output keep their tensors in one external file


@register
class QuantizeInt4(Rule):
    name = "quantize_int4"
    version = 2  # 2: sorted graph, checked by onnx's full checker
    tools = ("onnx", "numpy")  # the packing is kiln's own kernel: kiln's version is in every key
    Params = QuantizeInt4Params

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: QuantizeInt4Params, ctx: RunContext) -> dict[str, Any]:
        import onnx

        from kiln.runtime.onnx_graph import layers_to_quantize, load, publish

        model = load(inputs["model"][0])
        layers = layers_to_quantize(model, params.exclude_nodes, ctx.step)
        if not layers:
            raise StepError(ctx.step, nothing_to_quantize(model, params))
        packed = _pack_weights(model, layers, params)
        for layer in layers:
            _replace(model, layer, packed[(layer.weight, layer.transposed)], params)
        _drop_unused_initializers(model)
        if not any(op.domain == MS_DOMAIN for op in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
        publish(model, outputs["model"], ctx.step, outputs["data"] if params.external_data else None)
        return {"quantized_layers": len(layers), "quantized_ops": {"MatMulNBits": len(layers)},
                "block_size": params.block_size, "symmetric": params.symmetric}


def nothing_to_quantize(model, params: QuantizeInt4Params) -> str:
    """Why there is no layer for int4: what the graph has, and what to set."""
    from kiln.runtime.onnx_graph import describe_census, weight_layers, weight_op_census

    if weight_layers(model):
        hint = f"options.exclude_nodes ({len(params.exclude_nodes)} nodes) leaves none of them"
    else:
        hint = "int4 rewrites top-level MatMul/Gemm layers with a 2-D float weight only; try precision = \"int8\" (dynamic reaches Conv, LSTM and If/Loop/Scan bodies)"
    return f"int4 found no weight layer to quantize; the graph's ops with weights: {describe_census(weight_op_census(model.graph))}: {hint}"


def _pack_weights(model, layers, params: QuantizeInt4Params) -> dict[tuple[str, bool], dict]:
    """One packing per (weight, orientation): a weight shared by several layers is stored once."""
    import numpy as np
    from onnx import numpy_helper

    from kiln.native import repack

    inits = {t.name: t for t in model.graph.initializer}
    packed = {}
    for layer in layers:
        key = (layer.weight, layer.transposed)
        if key in packed:
            continue
        w = numpy_helper.to_array(inits[layer.weight])
        w = np.ascontiguousarray(w.T if layer.transposed else w)  # MatMulNBits wants W[K, N]
        B, scales, zero_points = repack.quantize_int4(w, params.block_size, symmetric=params.symmetric)
        stem = f"{layer.weight}_T" if layer.transposed else layer.weight
        tensors = {"B": (f"{stem}_Q4", B), "scales": (f"{stem}_scales", scales)}
        if zero_points is not None:
            tensors["zero_points"] = (f"{stem}_zero_points", zero_points)
        model.graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in tensors.values())
        packed[key] = {"K": w.shape[0], "N": w.shape[1], **{role: name for role, (name, _) in tensors.items()}}
    return packed


def _replace(model, layer, packed: dict, params: QuantizeInt4Params) -> None:
    """Swap the layer's node for MatMulNBits in place (same name, same output, same position)."""
    import onnx

    node = layer.node
    node_inputs = [layer.activation, packed["B"], packed["scales"], packed.get("zero_points", "")]
    if layer.bias:
        node_inputs += ["", layer.bias]  # input 4 (g_idx) unused; 5 is the bias
    new = onnx.helper.make_node(
        "MatMulNBits", node_inputs, list(node.output), name=node.name, domain=MS_DOMAIN,
        K=packed["K"], N=packed["N"], bits=4, block_size=params.block_size, accuracy_level=params.accuracy_level,
    )
    while node_inputs and node_inputs[-1] == "":
        node_inputs.pop()
    del new.input[len(node_inputs):]
    node.CopyFrom(new)


def _drop_unused_initializers(model) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    used |= _subgraph_inputs(model.graph)
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _subgraph_inputs(graph) -> set[str]:
    """Names read inside If/Loop/Scan bodies, which can use the outer graph's initializers."""
    names = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names |= {name for n in sub.node for name in n.input} | _subgraph_inputs(sub)
    return names
