"""kind = "sklearn": a fitted scikit-learn estimator, made by a `module:function` factory or
unpickled from a joblib/pickle file (only with allow_pickle). skl2onnx converts it (ai.onnx.ml
operators: ONNX fp32 targets only); its reference outputs are the estimator's own predictions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Literal

from pydantic import Field, model_validator

from kiln.errors import StepError
from kiln.schema.fields import FACTORY, CrossError, Strict
from kiln.sources.base import REFERENCE_TOOLS, Resolver, SourceKind, call_factory

if TYPE_CHECKING:
    from kiln.plan.chains import Planner
    from kiln.plan.steps import Step
    from kiln.rules import RunContext


class SklearnSource(Strict):
    """A scikit-learn estimator: a `module:function` factory returning a fitted estimator (found
    beside the manifest or from the workspace root), or a joblib/pickle file (only with allow_pickle,
    since unpickling runs code). Converted to ONNX with skl2onnx (pip install 'kiln[sklearn]')."""

    kind: Literal["sklearn"]
    factory: str | None = Field(None, pattern=FACTORY, description="module:function returning a fitted estimator")
    path: str | None = Field(None, min_length=1, description="a .joblib/.pkl file with a fitted estimator (needs allow_pickle = true)")
    allow_pickle: bool = Field(False, description="allow loading a pickled estimator (pickle can run code)")

    @model_validator(mode="after")
    def _one_origin(self) -> "SklearnSource":
        if (self.factory is None) == (self.path is None):
            raise CrossError("factory", self.factory if self.factory is not None else "<missing>", "exactly one of source.factory (module:function) or source.path (a joblib/pickle file)")
        return self


class Sklearn(SourceKind):
    kind = "sklearn"
    Source = SklearnSource
    extra: ClassVar = (("sklearn", "skl2onnx"), "sklearn")
    framework: ClassVar[str | None] = "sklearn"  # pmml is written from the estimator itself (kiln.formats.pmml)
    simplify_onnx: ClassVar[bool] = False  # onnxsim does not know the ai.onnx.ml domain
    reference_tools: ClassVar[tuple[str, ...]] = (*REFERENCE_TOOLS, "scikit-learn")

    def check_target(self, name: str, target: Any) -> None:
        if target.format == "pmml":
            return  # sklearn2pmml converts the estimator; kiln.formats.pmml checks its keys
        if target.format != "onnx" or target.precision != "fp32":
            key, value = ("format", target.format) if target.format != "onnx" else ("precision", target.precision)
            raise CrossError(f"targets.{name}.{key}", value, "format = \"onnx\" with precision = \"fp32\" for a sklearn source (skl2onnx's ai.onnx.ml operators have no fp16/int8 form and no OpenVINO or TensorRT kernels)")
        if target.options.external_data is True:
            raise CrossError(f"targets.{name}.options.external_data", True, "\"auto\" or false for a sklearn source (skl2onnx writes the model in one file; an estimator's ONNX is far below the 2 GB limit)")

    def check_spec(self, spec: Any) -> None:
        if len(spec.inputs) != 1:
            raise CrossError("inputs", [t.name for t in spec.inputs], "one input for a sklearn source (the 2-D feature matrix the estimator's predict takes)")

    def files(self, source: SklearnSource, resolver: Resolver) -> tuple[Path, ...]:
        if source.factory:
            return (resolver.factory_file(source.factory),)
        path = resolver.file(source.path, "source.path")
        if not source.allow_pickle:
            raise resolver.error("source.allow_pickle", f"{path.name!r} is a pickled estimator, which can run code when loaded; refused unless the manifest sets source.allow_pickle = true (or give source.factory = \"module:function\")")
        return (path,)

    def onnx_step(self, planner: Planner, name: str, target: Any) -> tuple[Path, Step | None]:
        step = planner.add(name, "convert_sklearn", {
            "source": planner.source_params, "inputs": planner.inputs, "outputs": planner.outputs, "opset": target.opset,
        }, {"source": planner.resolved.source_files}, {"model": "model.onnx"})
        return step.outputs["model"], step

    def run_reference(self, feeds: Iterator[dict], files: list[Path], source: dict, inputs: list[dict],
                      outputs: list[dict], ctx: RunContext) -> Iterator[tuple[dict, dict]]:
        """The estimator itself on each batch; results shaped like the manifest's outputs (a regressor's
        [batch] predictions as [batch, 1] where the manifest says so, as skl2onnx outputs them)."""
        estimator = load_estimator(source, files, ctx.root)
        check_feature_names(model_feature_names(estimator), inputs[0].get("columns"), f"inputs.{inputs[0]['name']}.columns", source, ctx.step)
        for feed in feeds:
            yield feed, shaped_results(estimator_results(estimator, feed[inputs[0]["name"]]), outputs, type(estimator).__name__, ctx.step)


def load_estimator(source: dict[str, Any], files: list[Path], root: Path):
    """The fitted estimator: made by its factory, or unpickled from the file the manifest allowed."""
    if source.get("factory"):
        model = call_factory(source["factory"], files[0], root)
    else:
        import joblib  # a scikit-learn dependency; reads both joblib and plain pickle files

        model = joblib.load(files[0])
    if not hasattr(model, "predict") and not hasattr(model, "transform"):
        raise StepError("source", f"{source.get('factory') or files[0].name} gave {type(model).__name__}, not a scikit-learn estimator (no predict or transform)")
    return model


def estimator_results(estimator, features) -> tuple:
    """What the estimator computes, in skl2onnx's output order: a classifier's labels then class
    probabilities; a clusterer's labels then distances; a regressor's predictions; a transformer's
    output."""
    if hasattr(estimator, "predict_proba"):
        return estimator.predict(features), estimator.predict_proba(features)
    if hasattr(estimator, "predict") and hasattr(estimator, "transform"):
        return estimator.predict(features), estimator.transform(features)
    if hasattr(estimator, "predict"):
        return (estimator.predict(features),)
    return (estimator.transform(features),)


def model_feature_names(model: Any) -> list[str] | None:
    """The feature names the model was fitted with (from a DataFrame), in its order, or None when it has
    none: scikit-learn's feature_names_in_ (a Pipeline's or an LGBM estimator's too), XGBoost's as
    kiln.sources.xgboost.load_model kept them before dropping them, a LightGBM Booster's
    feature_name(); LightGBM's own Column_0.. (fitted on an array) are no names."""
    names = getattr(model, "kiln_feature_names", None)
    if names is None:
        names = getattr(model, "feature_names_in_", None)
    if names is None and callable(getattr(model, "feature_name", None)):  # a LightGBM Booster
        names = model.feature_name()
    if names is None or len(names) == 0:
        return None
    names = [str(n) for n in names]
    return None if names == [f"Column_{i}" for i in range(len(names))] else names


def check_feature_names(model_names: list[str] | None, declared: list[str] | None, key: str, source: dict, step: str) -> None:
    """Names the manifest declares for the features (an input's `columns`, a pmml target's
    feature_names) must be the model's, in its order: a model fitted on named columns and fed them
    in another order predicts garbage, and the reference fed the same way would agree with it."""
    if model_names is None or declared is None:
        return
    origin = source.get("path") or source.get("factory")
    for position, (want, got) in enumerate(zip(model_names, declared, strict=False)):  # a length mismatch is reported after
        if want != got:
            raise StepError(step, f"{key}[{position}] is {got!r} but {origin} was fitted with feature {want!r} there; allowed: the model's feature names in its order: {_listed(model_names)}")
    if len(model_names) != len(declared):
        raise StepError(step, f"{key}: {len(declared)} names but {origin} was fitted on {len(model_names)} features: {_listed(model_names)}")


def _listed(names: list[str]) -> str:
    return str(names) if len(names) <= 12 else str(names[:12])[:-1] + f", ... ({len(names)} in all)]"


def shaped_results(results: tuple, outputs: list[dict], model_name: str, step: str) -> dict:
    """The results as the manifest's outputs, by position: its dtypes, a 1-D regressor's predictions
    as the [batch, 1] column the converters (skl2onnx, onnxmltools) output."""
    import numpy as np

    if len(results) != len(outputs):
        raise StepError(step, f"{model_name} gives {len(results)} outputs but the manifest declares {len(outputs)}: {[t['name'] for t in outputs]}")
    shaped = {}
    for spec, value in zip(outputs, results, strict=True):
        value = np.asarray(value)
        if spec.get("shape") is not None and value.ndim == len(spec["shape"]) - 1:
            value = value.reshape(*value.shape, 1)
        try:
            shaped[spec["name"]] = np.ascontiguousarray(value.astype(spec["dtype"]))
        except (TypeError, ValueError):  # string class labels for an int64 label output
            raise StepError(step, f"{model_name} gives output {spec['name']!r} values like {value.ravel()[:1].tolist()}, which are not {spec['dtype']}; allowed: a model fitted on integer classes 0..N-1 (encode string classes with a LabelEncoder before fitting)") from None
    return shaped
