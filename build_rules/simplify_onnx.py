"""simplify_onnx: onnxsim's constant folding and dead-node removal on an ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import StepError, one_line
from kiln.rules import Params, Rule, RunContext, register


class SimplifyOnnxParams(Params):
    pass


@register
class SimplifyOnnx(Rule):
    name = "simplify_onnx"
    version = 1
    tools = ("onnx", "onnxsim")
    Params = SimplifyOnnxParams

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: SimplifyOnnxParams, ctx: RunContext) -> dict[str, Any]:
        import onnx
        import onnxsim

        model = onnx.load(str(inputs["model"][0]))
        before = len(model.graph.node)
        try:
            simplified, ok = onnxsim.simplify(model)
        except Exception as err:  # onnxsim raises bare RuntimeErrors from C++
            raise StepError(ctx.step, f"onnxsim failed: {one_line(err)}") from None
        if not ok:
            raise StepError(ctx.step, "onnxsim could not check the simplified model against the original")
        onnx.save(simplified, str(outputs["model"]))
        return {"nodes_before": before, "nodes_after": len(simplified.graph.node)}
