"""kind = "tensorflow": a Keras model (a `.keras` file, or a `module:function` factory returning a
keras.Model) or a TensorFlow SavedModel folder (its "serving_default" signature). The reference
outputs are the model itself run in TensorFlow; its ONNX comes from tf2onnx (build_rules/
export_onnx_tf.py) and its TFLite from TF's converter (build_rules/convert_tflite.py).

Every conversion starts from one serving function (`export_serving`): the manifest's inputs as
TensorSpecs (named axes dynamic, None), the model called on them, and a dict of the manifest's
outputs. It is written as a SavedModel with Keras' ExportArchive, which freezes the Keras 3
variables the converters cannot see otherwise: a plain tf.function handed to TF's TFLite converter
kept them as uninitialised READ_VARIABLE ops (outputs off by 1e31 in LiteRT). Keras models are NHWC
for images already; kiln keeps the source's layout (no transposes).

How inputs and outputs meet the manifest's names:
- a Keras model takes the manifest's inputs positionally, in order (one input: the tensor itself);
  it may return a tensor (one output), a list/tuple (by position) or a dict (by name);
- a SavedModel's serving signature takes its inputs by name: the manifest's names, or, for a
  one-input signature, whatever it is called; its outputs are matched by name, or by position where
  they are Keras' positional `output_0`, `output_1`... (what `model.export()` writes) or where there
  is one. Anything else fails, listing what the model has.
"""

from __future__ import annotations

import os
import re
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

SERVING_SIGNATURE = "serving_default"
SAVED_MODEL_FILE = "saved_model.pb"
KERAS_POSITIONAL_OUTPUT = re.compile(r"^output_(\d+)$")  # what Keras' model.export() names a model's outputs
# Formats a TensorFlow source can give: through its own ONNX (tf2onnx), or directly (tflite, savedmodel).
GIVES = ("onnx", "openvino", "tensorrt", "tflite", "savedmodel")
# TensorFlow's versions key the steps that run it: the package is "tensorflow" or "tensorflow-cpu"
# (kiln's extra), whichever is installed (the other reads "not installed").
TF_TOOLS = ("tensorflow", "tensorflow-cpu", "keras")


class TensorflowSource(Strict):
    """A Keras/TensorFlow model: a `.keras` file or a SavedModel folder (path), or a `module:function`
    factory returning a keras.Model (found beside the manifest or from the workspace root). Needs
    pip install 'kiln[tensorflow]'."""

    kind: Literal["tensorflow"]
    path: str | None = Field(None, min_length=1, description="a .keras file, or a SavedModel folder (its serving_default signature)")
    factory: str | None = Field(None, pattern=FACTORY, description="module:function returning a keras.Model")

    @model_validator(mode="after")
    def _one_origin(self) -> "TensorflowSource":
        if (self.factory is None) == (self.path is None):
            raise CrossError("factory", self.factory if self.factory is not None else "<missing>", "exactly one of source.factory (module:function) or source.path (a .keras file or a SavedModel folder)")
        return self


class Tensorflow(SourceKind):
    kind = "tensorflow"
    Source = TensorflowSource
    extra: ClassVar = (("tensorflow", "keras", "tf2onnx"), "tensorflow")
    framework: ClassVar[str | None] = "tensorflow"  # formats made from the model itself, not its ONNX (kiln.define.spec)
    reference_tools: ClassVar[tuple[str, ...]] = (*REFERENCE_TOOLS, *TF_TOOLS)

    def check_target(self, name: str, target: Any) -> None:
        if target.format not in GIVES:
            raise CrossError(f"targets.{name}.format", target.format, f"a format a tensorflow source can give {GIVES}")
        options = getattr(target, "options", None)
        if getattr(options, "external_data", None) is True:
            raise CrossError(f"targets.{name}.options.external_data", True, "\"auto\" or false for a tensorflow source (tf2onnx writes the model in one file)")

    def check_spec(self, spec: Any) -> None:
        for i, tensor in enumerate(spec.inputs):
            if tensor.shape is None:
                raise CrossError(f"inputs[{i}].shape", "<missing>", "a shape for every input of a tensorflow source (it becomes the serving signature's TensorSpec; name dynamic axes)")

    def files(self, source: TensorflowSource, resolver: Resolver) -> tuple[Path, ...]:
        """The factory's module; the .keras file; or every file of the SavedModel folder,
        saved_model.pb first (variables/ and assets/ included: their bytes are the weights)."""
        if source.factory:
            return (resolver.factory_file(source.factory),)
        path = resolver.path(source.path, "source.path")
        if path.is_file():
            if path.suffix != ".keras":
                raise resolver.error("source.path", f"{path.name!r} is not allowed; expected a .keras file or a SavedModel folder (legacy .h5 files: load and save them as .keras)")
            return (path,)
        if not (path / SAVED_MODEL_FILE).is_file():
            raise resolver.error("source.path", f"{str(path)!r} is neither a .keras file nor a SavedModel folder (no {SAVED_MODEL_FILE})")
        rest = sorted(p for p in path.rglob("*") if p.is_file() and p.name != SAVED_MODEL_FILE
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
        return (path / SAVED_MODEL_FILE, *rest)

    def listed_folder(self, files: tuple[Path, ...]) -> Path | None:
        return files[0].parent if files[0].name == SAVED_MODEL_FILE else None

    def onnx_step(self, planner: Planner, name: str, target: Any) -> tuple[Path, Step | None]:
        step = planner.add(name, "export_onnx_tf", {
            "source": planner.source_params, "inputs": planner.inputs, "outputs": planner.outputs, "opset": target.opset,
        }, {"source": planner.resolved.source_files}, {"model": "model.onnx"})
        return step.outputs["model"], step

    def run_reference(self, feeds: Iterator[dict], files: list[Path], source: dict, inputs: list[dict],
                      outputs: list[dict], ctx: RunContext) -> Iterator[tuple[dict, dict]]:
        """The model in TensorFlow (eager, inference mode) through the same serving function the
        converters are given, outputs cast to the manifest's dtypes."""
        import numpy as np

        tf = import_tensorflow()
        model = load_model(source, files, ctx.root)
        serve, _ = serving_function(model, inputs, outputs)
        names = [t["name"] for t in inputs]
        for feed in feeds:
            result = serve(*(tf.constant(feed[name]) for name in names))
            yield feed, {t["name"]: np.ascontiguousarray(result[t["name"]].numpy().astype(t["dtype"])) for t in outputs}


def import_tensorflow():
    """tensorflow, its C++ logging quieted (it otherwise floods the step's log) and one intra-op
    thread where it is not yet initialised, so reductions run in a fixed order."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialised in this process: keep its settings
        pass
    return tf


def load_model(source: dict[str, Any], files: list[Path], root: Path):
    """The source model: a keras.Model (factory or .keras file) or a loaded SavedModel object."""
    tf = import_tensorflow()
    import keras

    if source.get("factory"):
        model = call_factory(source["factory"], files[0], root)
        if not isinstance(model, keras.Model):
            raise StepError("source", f"{source['factory']} returned {type(model).__name__}, not a keras.Model")
        return model
    if files[0].suffix == ".keras":
        # safe_mode: a Lambda layer's pickled Python code is refused, as kiln refuses pickle files
        return keras.saving.load_model(files[0], compile=False, safe_mode=True)
    loaded = tf.saved_model.load(str(files[0].parent))
    if SERVING_SIGNATURE not in loaded.signatures:
        raise StepError("source", f"the SavedModel {files[0].parent.name!r} has no {SERVING_SIGNATURE!r} signature; it has {sorted(loaded.signatures)}")
    return loaded


def tensor_specs(inputs: list[dict]) -> list:
    """The manifest's inputs as TensorSpecs: named axes dynamic (None), integers fixed."""
    tf = import_tensorflow()
    return [tf.TensorSpec([d if isinstance(d, int) else None for d in t["shape"]], tf.as_dtype(t["dtype"]), name=t["name"]) for t in inputs]


def serving_function(model, inputs: list[dict], outputs: list[dict]):
    """(serve(*tensors) -> {manifest output name: tensor}, its input signature) for the model."""
    input_names = [t["name"] for t in inputs]
    output_names = [t["name"] for t in outputs]
    if hasattr(model, "signatures"):  # a loaded SavedModel: its serving signature, by name
        signature = model.signatures[SERVING_SIGNATURE]
        keys = signature_inputs(signature, input_names)

        def call(args):
            return signature(**dict(zip(keys, args, strict=True)))
    else:
        def call(args):
            return model(args[0] if len(args) == 1 else list(args), training=False)

    def serve(*args):
        return named_outputs(call(args), output_names)

    return serve, tensor_specs(inputs)


def signature_inputs(signature, names: list[str]) -> list[str]:
    """The signature's input names for the manifest's inputs, in manifest order."""
    _, by_name = signature.structured_input_signature
    have = sorted(by_name)
    if set(names) == set(have):
        return names
    if len(names) == len(have) == 1:
        return have
    raise StepError("source", f"the SavedModel's {SERVING_SIGNATURE} signature takes inputs {have}; the manifest declares {names}")


def named_outputs(result: Any, names: list[str]) -> dict:
    """The model's result as {manifest output name: tensor} (module docstring: how names meet)."""
    if isinstance(result, dict):
        keys = list(result)
        if all(name in result for name in names):
            return {name: result[name] for name in names}
        positional = sorted((int(m.group(1)), k) for k in keys if (m := KERAS_POSITIONAL_OUTPUT.match(k)))
        if len(positional) == len(keys) == len(names) and [i for i, _ in positional] == list(range(len(keys))):
            return {name: result[key] for name, (_, key) in zip(names, positional, strict=True)}
        if len(keys) == len(names) == 1:
            return {names[0]: result[keys[0]]}
        raise StepError("source", f"the model's outputs are {sorted(keys)}; the manifest declares {names} (name them as the model does)")
    values = list(result) if isinstance(result, (list, tuple)) else [result]
    if len(values) != len(names):
        raise StepError("source", f"the model returns {len(values)} outputs but the manifest declares {len(names)}: {names}")
    return dict(zip(names, values, strict=True))


def export_serving(source: dict[str, Any], files: list[Path], inputs: list[dict], outputs: list[dict], root: Path, folder: Path) -> None:
    """Write the serving function (module docstring) as a SavedModel in `folder`, variables frozen
    into what the converters read; signature "serving_default", inputs and outputs by the manifest's
    names."""
    import_tensorflow()
    import keras

    model = load_model(source, files, root)
    serve, specs = serving_function(model, inputs, outputs)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SERVING_SIGNATURE, serve, input_signature=specs)
    archive.write_out(str(folder), verbose=False)
