"""quantize_dynamic: fp32 ONNX -> int8 weights with activations quantized at run time, by
onnxruntime's quantize_dynamic: per-channel symmetric int8 weights on every MatMul whose B is a
weight (Gemm is rewritten to MatMul by the quantizer; attention-score MatMuls, which have no
weight, and the attention-mask Add stay fp32). Byte-deterministic across runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import StepError, one_line
from kiln.rules import Params, Rule, RunContext, register


class QuantizeDynamicParams(Params):
    per_channel: bool = True
    op_types: list[str] = ["MatMul"]
    exclude_nodes: list[str] = []


@register
class QuantizeDynamic(Rule):
    name = "quantize_dynamic"
    version = 1
    tools = ("onnx", "onnxruntime")
    Params = QuantizeDynamicParams

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: QuantizeDynamicParams, ctx: RunContext) -> dict[str, Any]:
        import logging

        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from kiln.runtime.onnx_graph import layers_to_quantize

        logging.getLogger("onnxruntime").setLevel(logging.WARNING)
        layers_to_quantize(onnx.load(str(inputs["model"][0]), load_external_data=False), params.exclude_nodes, ctx.step)  # checks the names
        try:
            quantize_dynamic(
                str(inputs["model"][0]), str(outputs["model"]), op_types_to_quantize=params.op_types,
                per_channel=params.per_channel, weight_type=QuantType.QInt8, nodes_to_exclude=params.exclude_nodes,
            )
        except Exception as err:  # onnxruntime.quantization raises assorted plain exceptions
            raise StepError(ctx.step, f"dynamic int8 quantization failed: {one_line(err)}") from None
        graph = onnx.load(str(outputs["model"]), load_external_data=False).graph
        return {"quantized_matmuls": sum(n.op_type == "MatMulInteger" for n in graph.node), "nodes": len(graph.node)}
