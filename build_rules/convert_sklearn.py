"""convert_sklearn: a fitted scikit-learn estimator -> ONNX (ai.onnx + ai.onnx.ml), with skl2onnx.

The graph's input is the manifest's one input (its dtype and shape, named axes dynamic); its
outputs are renamed to the manifest's outputs by position (skl2onnx's order: a classifier gives
label then probabilities, a regressor or transformer one tensor). Classifiers output plain tensors
(no ZipMap), which any runtime can compare. skl2onnx names the graph with a random UUID; kiln names
it after the model and drops duplicate opset imports, so the bytes are reproducible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import StepError, one_line
from kiln.rules import Params, Rule, RunContext, register


class ConvertSklearnParams(Params):
    source: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    opset: int


@register
class ConvertSklearn(Rule):
    name = "convert_sklearn"
    version = 1
    tools = ("scikit-learn", "skl2onnx", "onnx")
    Params = ConvertSklearnParams

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ConvertSklearnParams, ctx: RunContext) -> dict[str, Any]:
        from skl2onnx import convert_sklearn

        from kiln.runtime.onnx_graph import canonicalize_converted, publish, rename_outputs
        from kiln.sources.sklearn import load_estimator

        estimator = load_estimator(params.source, inputs["source"], ctx.root)
        options = {"zipmap": False} if hasattr(estimator, "predict_proba") else None
        try:
            model = convert_sklearn(estimator, name="kiln", initial_types=[_initial_type(params.inputs[0])],
                                    options=options, target_opset=params.opset)
        except Exception as err:  # skl2onnx raises RuntimeError / MissingShapeCalculator / NotImplementedError
            raise StepError(ctx.step, f"skl2onnx cannot convert {type(estimator).__name__}: {one_line(err)[:300]}") from None
        rename_outputs(model, [t["name"] for t in params.outputs], ctx.step)
        canonicalize_converted(model)
        publish(model, outputs["model"], ctx.step)  # sorted, written, full-checked
        return {"estimator": type(estimator).__name__, "nodes": len(model.graph.node), "opset": params.opset}


def _initial_type(spec: dict[str, Any]):
    from skl2onnx.common import data_types

    types = {"float32": data_types.FloatTensorType, "float64": data_types.DoubleTensorType, "int64": data_types.Int64TensorType,
             "int32": data_types.Int32TensorType, "bool": data_types.BooleanTensorType}
    if spec["dtype"] not in types:
        raise StepError("inputs", f"input {spec['name']!r}: dtype {spec['dtype']} is not one skl2onnx takes; use one of {sorted(types)}")
    dims = [d if isinstance(d, int) else None for d in spec.get("shape") or [None, None]]
    return spec["name"], types[spec["dtype"]](dims)
