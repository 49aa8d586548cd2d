"""quantize_int4: fp32 ONNX -> 4-bit weight-only model. Every weight layer (MatMul / Gemm with a 2-D
float initializer B, see kiln.runtime.onnx_graph) becomes one com.microsoft MatMulNBits node (bits = 4)
whose packed weights, per-block scales and zero points come from kiln's native blockwise kernel
(kiln.native.repack.quantize_int4, the same bytes as onnxruntime's own quantizer but several times faster).
A Gemm's bias moves to MatMulNBits' bias input. Activations stay fp32 at the graph level;
accuracy_level 4 lets onnxruntime's CPU kernel quantize them to int8 blockwise inside the matmul.
onnxruntime's MatMulNBitsQuantizer skips Gemm (most of a BERT after onnxsim), hence kiln's rewrite.
A model with no weight layer left to rewrite fails the step (an fp32 model is never published as
int4), naming the weight ops it does have; the written file passes onnx's full checker.
options.fallback = "auto" as for dynamic int8 (kiln.runtime.budget), the kept layers in 8-bit blocks;
its per-layer scan, run here only when the all-quantized model fails, writes each layer as scan_layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from kiln.errors import StepError
from kiln.rules import Params, Rule, RunContext, register
from kiln.runtime.budget import fallback_memory_mib, within_budget
from kiln.runtime.scan import ScanHooks
from kiln.runtime.embeddings import embedding_facts, quantize_for_target

MS_DOMAIN = "com.microsoft"
EIGHT_BIT_BLOCK = 128  # the fallback's 8-bit layers (see _node)


class QuantizeInt4Params(Params):
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    exclude_nodes: list[str] = []
    external_data: bool = False  # the model and the "data" output keep their tensors in one external file
    embeddings: Literal["fp32", "int8", "int4"] = "fp32"  # large Gather tables -> GatherBlockQuantized
    fallback: dict[str, Any] | None = None  # options.fallback = "auto": the gates to reach (kiln.runtime.budget)


@register
class QuantizeInt4(Rule):
    name = "quantize_int4"
    # 2: sorted graph, checked by onnx's full checker
    # 3: embeddings (GatherBlockQuantized); the fallback keeps layers in 8-bit blocks
    # 4: the fallback's per-layer scan runs here (was the scan_layers step), only when the all-quantized model fails
    version = 4
    tools = ("onnx", "numpy")  # the packing is kiln's own kernel: kiln's version is in every key
    Params = QuantizeInt4Params
    cost = 10  # with fallback = "auto": a scan and a search

    @classmethod
    def tools_for(cls, params: dict[str, Any]) -> tuple[str, ...]:
        """The fallback's scan and search measure the model in onnxruntime: its version then keys the step."""
        return (*cls.tools, "onnxruntime") if params.get("fallback") else cls.tools

    @classmethod
    def memory_mib(cls, params: dict[str, Any], input_bytes: int) -> int:
        return super().memory_mib(params, input_bytes) + fallback_memory_mib(params)

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: QuantizeInt4Params, ctx: RunContext) -> dict[str, Any]:
        from kiln.runtime.onnx_graph import layers_to_quantize, load, publish

        model = load(inputs["model"][0])
        layers = layers_to_quantize(model, params.exclude_nodes, ctx.step)
        if not layers:
            raise StepError(ctx.step, nothing_to_quantize(model, params))
        notes: dict[str, Any] = {}
        quantized, facts = within_budget(lambda kept: _quantize(model, layers, kept, params, notes), inputs, params.fallback, ctx,
                                         kept_as="8-bit blocks (int8 activations)", max_kept=len(layers), hooks=ScanHooks(int4_layer=scan_layer))
        publish(quantized, outputs["model"], ctx.step, outputs["data"] if params.external_data else None)
        kept = len(facts.get("fallback", {}).get("kept", []))
        return {"quantized_layers": len(layers), "quantized_ops": {"MatMulNBits": len(layers)}, "bits": {"4": len(layers) - kept, "8": kept},
                "block_size": params.block_size, "symmetric": params.symmetric} | embedding_facts(notes, quantized) | facts


def _quantize(model, layers, kept: list[str], params: QuantizeInt4Params, notes: dict[str, Any]):
    """A copy of `model` with every layer a MatMulNBits node: 4 bits, or 8 for the `kept` ones (the
    fallback's higher precision: blockwise int8 costs twice int4's bytes, a quarter of fp32's)."""
    import onnx

    from kiln.runtime.onnx_graph import weight_kn

    quantized = onnx.ModelProto()
    quantized.CopyFrom(model)
    by_name = {node.name: i for i, node in enumerate(quantized.graph.node)}
    weights = {t.name: t for t in model.graph.initializer}
    packed: dict[tuple[str, bool, int], tuple] = {}  # a weight shared by several layers is packed and stored once
    for layer in layers:
        bits = 8 if layer.node.name in kept else 4
        key = (layer.weight, layer.transposed, bits)
        if key not in packed:
            packed[key] = _packed(layer, weight_kn(weights[layer.weight], layer.transposed), params, bits)
            quantized.graph.initializer.extend(packed[key][1])
        quantized.graph.node[by_name[layer.node.name]].CopyFrom(_node(layer, packed[key][0], params, bits))
    _drop_unused_initializers(quantized)
    if not any(op.domain == MS_DOMAIN for op in quantized.opset_import):
        quantized.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    quantize_for_target(quantized, params.embeddings, notes)
    return quantized


def matmul_nbits(layer, w, params: QuantizeInt4Params, bits: int = 4):
    """(the MatMulNBits node replacing `layer`, its new initializers) for the weight w[K, N]."""
    shape, inits = _packed(layer, w, params, bits)
    return _node(layer, shape, params, bits), inits


def scan_layer(layer, w, settings):
    """For the fallback's scan (kiln.runtime.scan): the 4-bit MatMulNBits this rule writes for the
    layer, with the scan's block_size, symmetric and accuracy_level."""
    params = QuantizeInt4Params(block_size=settings.block_size, symmetric=settings.symmetric, accuracy_level=settings.accuracy_level)
    return matmul_nbits(layer, w, params, bits=4)


def _packed(layer, w, params: QuantizeInt4Params, bits: int) -> tuple[dict, list]:
    """({K, N, B, scales, zero_points: initializer names}, the initializers) of w[K, N] in blocks along K."""
    from onnx import numpy_helper

    from kiln.native import repack

    if bits == 4:
        B, scales, zero_points = repack.quantize_int4(w, params.block_size, symmetric=params.symmetric)
    else:
        B, scales, zero_points = int8_blocks(w, EIGHT_BIT_BLOCK)
    base = f"{layer.weight}_T" if layer.transposed else layer.weight
    stem = base if bits == 4 else f"{base}_Q8"  # a weight shared by a 4-bit and an 8-bit layer gets both
    tensors = {"B": (f"{base}_Q{bits}", B), "scales": (f"{stem}_scales", scales)}
    if zero_points is not None:
        tensors["zero_points"] = (f"{stem}_zero_points", zero_points)
    shape = {"K": w.shape[0], "N": w.shape[1], **{role: name for role, (name, _) in tensors.items()}}
    return shape, [numpy_helper.from_array(array, name) for name, array in tensors.values()]


def int8_blocks(w, block_size: int):
    """MatMulNBits' 8-bit layout of w[K, N]: B[N, k_blocks, block_size] uint8, per-block scales
    [N * k_blocks] and uint8 zero points [N * k_blocks]; K is zero-padded to whole blocks. Each
    block is quantized asymmetrically by kiln's native kernel (ONNX DynamicQuantizeLinear's scale
    and zero point over the block's range widened to hold 0): dequantized as (q - zp) * scale."""
    import numpy as np

    from kiln.native import repack

    K, N = w.shape
    blocks = -(-K // block_size)
    padded = np.zeros((N, blocks * block_size), np.float32)
    padded[:, :K] = w.T
    q, scales, zero_points = repack.quantize_int8(padded.reshape(N * blocks, block_size), symmetric=False, axis=0)
    return q.reshape(N, blocks, block_size), scales.reshape(-1), zero_points.reshape(-1)


def nothing_to_quantize(model, params: QuantizeInt4Params) -> str:
    """Why there is no layer for int4: what the graph has, and what to set."""
    from kiln.runtime.onnx_graph import describe_census, weight_layers, weight_op_census

    if weight_layers(model):
        hint = f"options.exclude_nodes ({len(params.exclude_nodes)} nodes) leaves none of them"
    else:
        hint = "int4 rewrites top-level MatMul/Gemm layers with a 2-D float weight only; try precision = \"int8\" (dynamic reaches Conv, LSTM and If/Loop/Scan bodies)"
    return f"int4 found no weight layer to quantize; the graph's ops with weights: {describe_census(weight_op_census(model.graph))}: {hint}"


def _node(layer, packed: dict, params: QuantizeInt4Params, bits: int):
    """The MatMulNBits node taking the layer's place (same name, same output). The fallback's 8-bit
    layers always compute with int8 activations (accuracy_level 4) in blocks of 128: onnxruntime's
    fp32 path for 8-bit weights dequantizes them every call, 1.6x slower than fp32 on BERT (31 vs
    19 ms at batch 1 / sequence 128, 2 threads); its int8 path runs at 1.08x with blocks of 32 and
    0.92x with blocks of 128, which at 8 bits lose nothing that matters (measured: all layers 8-bit)."""
    import onnx

    node = layer.node
    node_inputs = [layer.activation, packed["B"], packed["scales"], packed.get("zero_points", "")]
    if layer.bias:
        node_inputs += ["", layer.bias]  # input 4 (g_idx) unused; 5 is the bias
    while node_inputs and node_inputs[-1] == "":
        node_inputs.pop()
    return onnx.helper.make_node(
        "MatMulNBits", node_inputs, list(node.output), name=node.name, domain=MS_DOMAIN,
        K=packed["K"], N=packed["N"], bits=bits, block_size=params.block_size if bits == 4 else EIGHT_BIT_BLOCK,
        accuracy_level=params.accuracy_level if bits == 4 else 4,
    )


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
