"""quantize_dynamic: fp32 ONNX -> int8 weights with activations quantized at run time, by
onnxruntime's quantize_dynamic: per-channel symmetric int8 weights on every op of op_types whose
weight is an initializer (MatMul with a weight B, Gemm included: the quantizer rewrites Gemm to
MatMul; LSTM; com.microsoft Attention), inside If / Loop / Scan bodies too (EnableSubgraph).
Attention-score MatMuls, which have no weight, and the attention-mask Add stay fp32.

Conv is not in the default op types: onnxruntime's ConvInteger runs several times slower than its
fp32 Conv on CPU (0.54 vs 0.08 ms on tinycnn), so a CNN quantized dynamically is smaller but slower;
options.op_types = ["MatMul", "Conv"] asks for it anyway (static QDQ is onnxruntime's advice for CNNs).

options.embeddings (int8 by default) turns the large embedding tables (a Gather on a 2-D float
initializer, e.g. BERT's 47 MB word embedding, most of an int8 BERT otherwise) into onnxruntime's
GatherBlockQuantized with 8-bit (or 4-bit) blocks: kiln.runtime.embeddings.
options.fallback = "auto" keeps the layers a per-layer sensitivity scan finds most damaging in fp32,
fewest first, until the target's gates pass on the validation data (kiln.runtime.budget); the scan
(kiln.runtime.scan) runs in this step, and only when the all-quantized model fails the gates.

A model in which nothing was quantized fails the step, naming the weight ops the graph does have:
an fp32 model is never published as int8. The facts count the quantized ops by type.
Byte-deterministic across runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from kiln.errors import StepError, one_line
from kiln.rules import Params, Rule, RunContext, register
from kiln.runtime.budget import fallback_memory_mib, within_budget
from kiln.runtime.embeddings import embedding_facts, quantize_for_target

# What onnxruntime's dynamic (IntegerOps) quantizer rewrites on CPU; Gemm arrives as MatMul.
DEFAULT_OP_TYPES = ["Attention", "LSTM", "MatMul"]


class QuantizeDynamicParams(Params):
    per_channel: bool = True
    op_types: list[str] = DEFAULT_OP_TYPES
    exclude_nodes: list[str] = []
    external_data: bool = False  # the model and the "data" output keep their tensors in one external file
    embeddings: Literal["fp32", "int8", "int4"] = "fp32"  # large Gather tables -> GatherBlockQuantized
    fallback: dict[str, Any] | None = None  # options.fallback = "auto": the gates to reach (kiln.runtime.budget)


@register
class QuantizeDynamic(Rule):
    name = "quantize_dynamic"
    # 2: subgraphs quantized, LSTM/Attention by default, sorted graph checked by onnx's full checker
    # 3: embeddings (GatherBlockQuantized) and the accuracy-budget fallback
    # 4: the fallback's per-layer scan runs here (was the scan_layers step), only when the all-quantized model fails
    version = 4
    tools = ("onnx", "onnxruntime")
    Params = QuantizeDynamicParams
    cost = 4

    @classmethod
    def memory_mib(cls, params: dict[str, Any], input_bytes: int) -> int:
        return super().memory_mib(params, input_bytes) + fallback_memory_mib(params)

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: QuantizeDynamicParams, ctx: RunContext) -> dict[str, Any]:
        import logging

        from kiln.runtime.onnx_graph import ACTIVATION_QUANTIZERS, QUANTIZED_WEIGHT_OPS, count_ops, layers_to_quantize, load, publish

        logging.getLogger("onnxruntime").setLevel(logging.WARNING)
        model = load(inputs["model"][0])
        layers = layers_to_quantize(model, params.exclude_nodes, ctx.step)  # checks the names, and names nameless nodes
        notes: dict[str, Any] = {}
        quantized, facts = within_budget(lambda kept: _quantize(model, params, kept, outputs["model"].parent, ctx, notes),
                                         inputs, params.fallback, ctx, max_kept=len(layers) - 1)
        weight_ops = count_ops(quantized.graph, QUANTIZED_WEIGHT_OPS)
        if not weight_ops:
            raise StepError(ctx.step, nothing_quantized(model, params))
        publish(quantized, outputs["model"], ctx.step, outputs["data"] if params.external_data else None)
        return {"quantized_ops": weight_ops | count_ops(quantized.graph, ACTIVATION_QUANTIZERS), "nodes": len(quantized.graph.node)} | embedding_facts(notes, quantized) | facts


def _quantize(model, params: QuantizeDynamicParams, kept: list[str], scratch: Path, ctx: RunContext, notes: dict[str, Any]):
    """onnxruntime's dynamic quantization of a copy of `model`, with the manifest's exclude_nodes and
    `kept` left fp32, then the embeddings quantized as the target asks."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic


    source = onnx.ModelProto()
    source.CopyFrom(model)  # the quantizer rewrites the proto it is given (Gemm -> MatMul)
    # The quantizer writes into a private folder: with external data it puts its own data file
    # beside the model it saves, which must not land in the step's folder.
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".kiln-quantize-") as tmp:
        written = Path(tmp) / "model.onnx"
        try:
            # The proto, not the path: the quantizer then sees the names kiln gave nameless nodes, and
            # writes its shape-inferred copy to a temporary folder, not beside another step's output.
            quantize_dynamic(
                source, str(written), op_types_to_quantize=params.op_types, per_channel=params.per_channel,
                weight_type=QuantType.QInt8, nodes_to_exclude=excluded_names(model, [*params.exclude_nodes, *kept]),
                use_external_data_format=params.external_data, extra_options={"EnableSubgraph": True},
            )
        except Exception as err:  # onnxruntime.quantization raises assorted plain exceptions
            raise StepError(ctx.step, f"dynamic int8 quantization failed: {one_line(err)}") from None
        quantized = onnx.load(str(written))
    quantize_for_target(quantized, params.embeddings, notes)
    return quantized


def excluded_names(model, exclude: list[str]) -> list[str]:
    """The names the quantizer must skip: an excluded Gemm is rewritten to MatMul before quantizing
    and renamed <name>_MatMul on the way, so its new name is excluded too (else it is quantized anyway)."""
    gemms = {node.name for node in model.graph.node if node.op_type == "Gemm"}
    return sorted(set(exclude) | {f"{name}_MatMul" for name in exclude if name in gemms})


def nothing_quantized(model, params: QuantizeDynamicParams) -> str:
    """Why an int8 target would be an fp32 model: which weight ops the graph has, and what to set."""
    from kiln.runtime.onnx_graph import describe_census, weight_op_census

    census = weight_op_census(model.graph)
    present = "" if not census else f"; the graph's ops with weights: {describe_census(census)}"
    wanted = sorted(set(census) - set(params.op_types) - ({"Gemm"} if "MatMul" in params.op_types else set()))
    if wanted:
        hint = f"add {', '.join(wanted)} to options.op_types (now {params.op_types})"
    elif census and params.exclude_nodes:
        hint = f"options.exclude_nodes ({len(params.exclude_nodes)} nodes) leaves none of them"
    elif census:
        hint = "onnxruntime's quantizer skipped all of them (weights not float, or inputs of unknown type)"
    else:
        hint = "the model has no MatMul/Gemm/Conv/LSTM/Attention with a weight initializer: publish it as fp32 or fp16 instead"
    return f"dynamic int8 quantized nothing with op_types {params.op_types}{present}: {hint}"
