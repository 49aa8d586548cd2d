"""convert_fp16: an fp32 ONNX model -> fp16, with onnxruntime's transformers float16 converter.

Chosen over onnxconverter-common, whose converter clamps weights above 1e4 by default and whose
BERT output fails to load in onnxruntime (a Cast type mismatch). Here weights are rounded to
nearest fp16 and clamped only beyond the fp16 range (+-65504); model inputs and outputs stay fp32
unless the manifest says otherwise; ops named in keep_fp32_ops (on top of onnxruntime's default
list of ops without fp16 kernels) stay fp32. The converter appends the Casts it puts on fp32
inputs at the end of the node list; the graph is sorted before it is written (see
kiln.runtime.onnx_graph.publish) so that consumers stricter than onnxruntime accept it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import StepError, one_line
from kiln.rules import Params, Rule, RunContext, register


class ConvertFp16Params(Params):
    keep_io_types: bool = True
    keep_fp32_ops: list[str] = []
    external_data: bool = False  # the model and the "data" output keep their tensors in one external file


@register
class ConvertFp16(Rule):
    name = "convert_fp16"
    version = 2  # 2: nodes topologically sorted, the written file passes onnx's full checker
    tools = ("onnx", "onnxruntime")
    Params = ConvertFp16Params

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ConvertFp16Params, ctx: RunContext) -> dict[str, Any]:
        import onnx
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        from kiln.runtime.onnx_graph import load_external_data, publish

        path = inputs["model"][0]
        if params.external_data:
            # The converter's own shape inference serializes the whole model (protobuf's 2 GB cap), so
            # it runs here on the proto without its weights (small tensors stay inline, shapes need no
            # values), and the weights are loaded after it.
            model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
            load_external_data(model, path.parent)
        else:
            model = onnx.load(str(path))
        try:
            converted = convert_float_to_float16(
                model, keep_io_types=params.keep_io_types,
                op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(params.keep_fp32_ops)),
                max_finite_val=65504.0, min_positive_val=5.96e-08, disable_shape_infer=params.external_data,
            )
        except Exception as err:  # the converter raises plain Exceptions on unsupported graphs
            raise StepError(ctx.step, f"fp16 conversion failed: {one_line(err)}") from None
        publish(converted, outputs["model"], ctx.step, outputs["data"] if params.external_data else None)
        kept = sum(1 for node in converted.graph.node if node.op_type in params.keep_fp32_ops)
        return {"nodes": len(converted.graph.node), "kept_fp32_nodes": kept}
