"""What the gradient-boosted-tree kinds (kiln.sources.xgboost, kiln.sources.lightgbm) share: the
[source] table (the library's own model file, a `module:function` factory, or a pickle only with
allow_pickle), the manifest rules (one [batch, features] float32 input; a classifier's integer label
and probabilities, or a regressor's [batch, 1] predictions), the convert_trees step and the
reference outputs (the library's own predict / predict_proba, through the kind's load_model).

onnxmltools converts both libraries (ai.onnx.ml TreeEnsemble operators, ONNX fp32 targets only) and
supports opsets up to CONVERTER_MAX_OPSET: a target that leaves opset out gets that opset, one that
asks for more fails at check time.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from pydantic import Field, model_validator

from kiln.errors import StepError
from kiln.schema.fields import FACTORY, CrossError, Strict
from kiln.sources.base import PICKLE_SUFFIXES, Resolver, SourceKind

if TYPE_CHECKING:
    from kiln.plan.chains import Planner
    from kiln.plan.steps import Step
    from kiln.rules import RunContext

CONVERTER_MAX_OPSET = 15  # onnxmltools 1.16 rejects more ("converter support (15)")
INTEGER_DTYPES = ("int64",)  # what the converters give a label


class TreesSource(Strict):
    """Fields of both tree kinds; each kind subclasses it with its own `kind` tag."""

    factory: str | None = Field(None, pattern=FACTORY, description="module:function returning a fitted model (sklearn API or a Booster)")
    path: str | None = Field(None, min_length=1, description="the library's own model file, or a pickle (needs allow_pickle = true)")
    allow_pickle: bool = Field(False, description="allow loading a pickled model (pickle can run code)")

    @model_validator(mode="after")
    def _one_origin(self) -> "TreesSource":
        if (self.factory is None) == (self.path is None):
            raise CrossError("factory", self.factory if self.factory is not None else "<missing>", "exactly one of source.factory (module:function) or source.path (a model file)")
        return self


class BoostedTrees(SourceKind):
    """The verbs of a tree kind; a subclass names its library, model-file suffixes and load_model."""

    library: ClassVar[str]  # the words errors use: "XGBoost"
    named: ClassVar[str]  # and for the source: "an xgboost source"
    model_suffixes: ClassVar[tuple[str, ...]]  # the library's own model files
    library_tools: ClassVar[tuple[str, ...]]  # its distributions, whose versions key the steps that load it
    simplify_onnx: ClassVar[bool] = False  # onnxsim does not know the ai.onnx.ml domain

    # ---- definition ---------------------------------------------------------------------------

    def check_target(self, name: str, target: Any) -> None:
        if target.format == "pmml":
            return  # sklearn2pmml converts the model; kiln.formats.pmml checks its keys
        if target.format != "onnx" or target.precision != "fp32":
            key, value = ("format", target.format) if target.format != "onnx" else ("precision", target.precision)
            raise CrossError(f"targets.{name}.{key}", value, f"format = \"onnx\" with precision = \"fp32\" for {self.named} (onnxmltools' ai.onnx.ml tree operators have no fp16/int8 form and no OpenVINO or TensorRT kernels)")
        if "opset" in target.model_fields_set and target.opset > CONVERTER_MAX_OPSET:
            raise CrossError(f"targets.{name}.opset", target.opset, f"at most {CONVERTER_MAX_OPSET} for {self.named} (onnxmltools converts trees up to opset {CONVERTER_MAX_OPSET}; leave opset out to get it)")
        if target.options.external_data is True:
            raise CrossError(f"targets.{name}.options.external_data", True, f"\"auto\" or false for {self.named} (onnxmltools writes the model in one file)")

    def check_spec(self, spec: Any) -> None:
        self._check_input(spec.inputs)
        self._check_outputs(spec.outputs)

    def _check_input(self, inputs: list[Any]) -> None:
        if len(inputs) != 1:
            raise CrossError("inputs", [t.name for t in inputs], f"one input for {self.named} (the 2-D feature matrix the model predicts from)")
        spec = inputs[0]
        if spec.dtype != "float32":
            raise CrossError(f"inputs.{spec.name}.dtype", spec.dtype, f"float32 for {self.named} (the tree operators compare float32 features)")
        if spec.shape is None or len(spec.shape) != 2 or not isinstance(spec.shape[1], int):
            raise CrossError(f"inputs.{spec.name}.shape", spec.shape, "[\"batch\", N] with N the model's feature count")

    def _check_outputs(self, outputs: list[Any]) -> None:
        shapes = [t.shape for t in outputs]
        if len(outputs) == 1:  # a regressor: onnxmltools gives its predictions as [batch, 1]
            if shapes[0] is None or len(shapes[0]) != 2 or shapes[0][1] != 1 or outputs[0].dtype != "float32":
                raise CrossError(f"outputs.{outputs[0].name}.shape", shapes[0], "[\"batch\", 1] float32 for a regressor's predictions")
        elif len(outputs) == 2:  # a classifier: label, then probabilities
            label, probabilities = outputs
            if label.dtype not in INTEGER_DTYPES or label.shape is None or len(label.shape) != 1:
                raise CrossError(f"outputs.{label.name}", f"dtype {label.dtype} shape {label.shape}", f"a classifier's label first: dtype one of {list(INTEGER_DTYPES)}, shape [\"batch\"]")
            if probabilities.dtype != "float32" or probabilities.shape is None or len(probabilities.shape) != 2:
                raise CrossError(f"outputs.{probabilities.name}", f"dtype {probabilities.dtype} shape {probabilities.shape}", "a classifier's probabilities second: float32, shape [\"batch\", classes]")
        else:
            raise CrossError("outputs", [t.name for t in outputs], f"one output (a regressor's predictions) or two (a classifier's label, then probabilities) for {self.named}")

    # ---- resolving ----------------------------------------------------------------------------

    def files(self, source: TreesSource, resolver: Resolver) -> tuple[Path, ...]:
        if source.factory:
            return (resolver.factory_file(source.factory),)
        path = resolver.file(source.path, "source.path")
        if path.suffix in PICKLE_SUFFIXES:
            if not source.allow_pickle:
                raise resolver.error("source.allow_pickle", f"{path.name!r} is a pickled model, which can run code when loaded; refused unless the manifest sets source.allow_pickle = true (or save it with the library's own save_model as {' or '.join(self.model_suffixes)})")
        elif path.suffix not in self.model_suffixes:
            raise resolver.error("source.path", f"{path.name!r}: suffix {path.suffix or '<none>'!r} is not a {self.library} model file; allowed: {list(self.model_suffixes)} (or a pickle with allow_pickle = true)")
        return (path,)

    # ---- planning -----------------------------------------------------------------------------

    def onnx_step(self, planner: Planner, name: str, target: Any) -> tuple[Path, Step | None]:
        opset = target.opset if "opset" in target.model_fields_set else CONVERTER_MAX_OPSET
        step = planner.add(name, "convert_trees", {
            "source": planner.source_params, "inputs": planner.inputs, "outputs": planner.outputs, "opset": opset,
        }, {"source": planner.resolved.source_files}, {"model": "model.onnx"})
        return step.outputs["model"], step

    # ---- running ------------------------------------------------------------------------------

    @abstractmethod
    def load_model(self, source: dict, files: list[Path], root: Path) -> Any:
        """The fitted model, as the library's sklearn-API class where one can hold it."""

    def results(self, model: Any, features: Any) -> tuple:
        """The model's own predictions in onnxmltools' output order (label, probabilities; or values)."""
        from kiln.sources.sklearn import estimator_results

        return estimator_results(model, features)

    def run_reference(self, feeds: Iterator[dict], files: list[Path], source: dict, inputs: list[dict],
                      outputs: list[dict], ctx: RunContext) -> Iterator[tuple[dict, dict]]:
        from kiln.sources.sklearn import check_feature_names, model_feature_names, shaped_results

        model = self.load_model(source, files, ctx.root)
        check_feature_count(model_feature_count(model), inputs[0], source, ctx.step)
        check_feature_names(model_feature_names(model), inputs[0].get("columns"), f"inputs.{inputs[0]['name']}.columns", source, ctx.step)
        for feed in feeds:
            yield feed, shaped_results(self.results(model, feed[inputs[0]["name"]]), outputs, type(model).__name__, ctx.step)


def model_feature_count(model: Any) -> int:
    """How many features the fitted model was trained on (sklearn API, XGBoost or LightGBM Booster)."""
    for attribute in ("n_features_in_", "num_features", "num_feature"):
        value = getattr(model, attribute, None)
        if value is not None:
            return int(value() if callable(value) else value)
    raise TypeError(f"{type(model).__name__} does not say how many features it takes")


def check_feature_count(count: int, spec: dict, source: dict, step: str) -> None:
    """The manifest's input must give the model exactly the features it was trained on."""
    declared = (spec.get("shape") or [None, None])[-1]
    if declared != count:
        origin = source.get("path") or source.get("factory")
        raise StepError(step, f"inputs.{spec['name']}.shape: {declared} features, but {origin} was trained on {count}; allowed: shape = [\"batch\", {count}]")


def library_error(text: str) -> str:
    """A native library's error as one line: its first line without the '[time] file.cc:123:' prefix
    (XGBoost appends a C++ stack trace)."""
    import re

    first = text.strip().splitlines()[0] if text.strip() else text
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", first)[:300]


def load_origin(source: dict, files: list[Path], root: Path) -> Any:
    """What a factory returns or a pickle holds (the manifest allowed it: resolving checked)."""
    from kiln.sources.sklearn import load_estimator

    return load_estimator(source, files, root)
