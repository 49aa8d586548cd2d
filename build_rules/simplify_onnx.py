"""simplify_onnx: onnxsim's constant folding and dead-node removal on an ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import StepError, one_line
from kiln.rules import Params, Rule, RunContext, register


# onnxsim is an optimisation, not a requirement: a model it cannot handle still builds without it.
SKIP_HINT = "; set options.simplify = false in the target to build it without onnxsim"


class SimplifyOnnxParams(Params):
    pass


@register
class SimplifyOnnx(Rule):
    name = "simplify_onnx"
    version = 1
    tools = ("onnx", "onnxsim")
    Params = SimplifyOnnxParams
    cost = 1.4

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: SimplifyOnnxParams, ctx: RunContext) -> dict[str, Any]:
        import onnx
        import onnxsim

        from kiln.runtime.onnx_graph import publish

        model = onnx.load(str(inputs["model"][0]))
        before = len(model.graph.node)
        try:
            simplified, ok = onnxsim.simplify(model)
        except Exception as err:  # onnxsim raises bare RuntimeErrors from C++
            raise StepError(ctx.step, f"onnxsim failed on {inputs['model'][0].name}: {one_line(err)[:400]}{SKIP_HINT}") from None
        if not ok:
            raise StepError(ctx.step, f"onnxsim could not check the simplified model against the original{SKIP_HINT}")
        publish(simplified, outputs["model"], ctx.step)  # sorted (a no-op on onnxsim's output), written, full-checked
        return {"nodes_before": before, "nodes_after": len(simplified.graph.node)}
