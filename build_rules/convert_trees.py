"""convert_trees: a fitted XGBoost or LightGBM model -> ONNX (ai.onnx.ml TreeEnsemble), with onnxmltools.

kiln meets the converter's demands for the user: the model comes from the kind's load_model (XGBoost
feature names dropped, since the converter accepts only f0..fN; LightGBM thresholds rounded down
to float32, so the float32 tree operators split every float32 input as LightGBM does), the opset is at most what
onnxmltools supports (the source kind caps it at planning, kiln.sources.boosted_trees), and a
classifier outputs plain tensors (no ZipMap). The outputs are renamed to the manifest's by position
(label then probabilities, or the regressor's values) and declared with the manifest's shapes (the
LightGBM converter declares a label of shape [1]); the graph is named and its opset imports
canonicalised as convert_sklearn does, so the bytes are reproducible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import StepError, one_line
from kiln.rules import Params, Rule, RunContext, register


class ConvertTreesParams(Params):
    source: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    opset: int


@register
class ConvertTrees(Rule):
    name = "convert_trees"
    version = 1
    tools = ("onnxmltools", "onnx")  # and the model's library (tools_for)
    Params = ConvertTreesParams

    @classmethod
    def tools_for(cls, params: dict[str, Any]) -> tuple[str, ...]:
        from kiln.sources import source_kind

        return (*source_kind(params["source"]["kind"]).library_tools, *cls.tools)

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ConvertTreesParams, ctx: RunContext) -> dict[str, Any]:
        from kiln.runtime.onnx_graph import canonicalize_converted, publish, rename_outputs
        from kiln.sources import source_kind
        from kiln.sources.boosted_trees import check_feature_count, model_feature_count
        from kiln.sources.sklearn import check_feature_names, model_feature_names

        model = source_kind(params.source["kind"]).load_model(params.source, inputs["source"], ctx.root)
        check_feature_count(model_feature_count(model), params.inputs[0], params.source, ctx.step)
        check_feature_names(model_feature_names(model), params.inputs[0].get("columns"), f"inputs.{params.inputs[0]['name']}.columns", params.source, ctx.step)
        refuse_misconverted(model, params.source, ctx.step)
        try:
            onnx_model = _convert(model, params.source["kind"], params.inputs[0], params.opset)
        except Exception as err:  # onnxmltools raises RuntimeError / NotImplementedError / its own types
            raise StepError(ctx.step, f"onnxmltools cannot convert {type(model).__name__} at opset {params.opset}: {one_line(err)[:300]}") from None
        rename_outputs(onnx_model, [t["name"] for t in params.outputs], ctx.step)
        _declare_shapes(onnx_model, params.outputs)
        canonicalize_converted(onnx_model)
        publish(onnx_model, outputs["model"], ctx.step)  # sorted, written, full-checked
        return {"model": type(model).__name__, "nodes": len(onnx_model.graph.node), "opset": params.opset}


# XGBoost objectives onnxmltools converts to wrong outputs (measured with onnxmltools 1.16 on iris:
# multi:softmax's probabilities off by up to 1.09, reg:logistic's values by up to 0.93); validation
# would catch it, but only after converting, and naming no cause.
MISCONVERTED_OBJECTIVES = ("multi:softmax", "reg:logistic")
CONVERTED_OBJECTIVES = ("binary:logistic", "multi:softprob", "reg:squarederror")


def refuse_misconverted(model: Any, source: dict[str, Any], step: str) -> None:
    """Refuse, naming what works, a model onnxmltools would convert wrongly: those XGBoost objectives,
    and a LightGBM classifier with string classes (its ONNX label would be the class index)."""
    import json

    import numpy as np

    origin = source.get("path") or source.get("factory")
    if source["kind"] == "xgboost":
        name = json.loads(model.get_booster().save_config())["learner"]["objective"]["name"]
        if name in MISCONVERTED_OBJECTIVES:
            raise StepError(step, f"{origin}: XGBoost objective {name!r} is converted wrongly by onnxmltools; allowed: another objective, e.g. {list(CONVERTED_OBJECTIVES)} (multi:softprob for multi:softmax: the same trees, its label the class of highest probability)")
    classes = getattr(model, "classes_", None)
    if source["kind"] == "lightgbm" and classes is not None and not np.issubdtype(np.asarray(classes).dtype, np.number):
        raise StepError(step, f"{origin}: {type(model).__name__} has string classes {np.asarray(classes)[:5].tolist()}; allowed: integer classes 0..N-1 (the int64 label output; encode them with a LabelEncoder before fitting)")


def _convert(model: Any, kind: str, spec: dict[str, Any], opset: int):
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType

    initial = [(spec["name"], FloatTensorType([None, spec["shape"][-1]]))]
    if kind == "xgboost":  # XGBoost itself splits float32 features on float32 thresholds: nothing to round
        return onnxmltools.convert_xgboost(model, name="kiln", initial_types=initial, target_opset=opset)
    from kiln.sources.lightgbm import float32_exact

    return onnxmltools.convert_lightgbm(float32_exact(model), name="kiln", initial_types=initial, target_opset=opset, zipmap=False)


def _declare_shapes(model, specs: list[dict[str, Any]]) -> None:
    """Each graph output typed with its manifest shape (named axes symbolic)."""
    by_name = {spec["name"]: spec for spec in specs}
    for output in model.graph.output:
        shape = output.type.tensor_type.shape
        del shape.dim[:]
        for dim in by_name[output.name]["shape"]:
            entry = shape.dim.add()
            if isinstance(dim, int):
                entry.dim_value = dim
            else:
                entry.dim_param = dim
