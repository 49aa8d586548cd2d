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

How inputs and outputs meet the manifest's names (never by position where the model has names, so a
manifest listing them in another order than the model cannot feed or label the wrong tensor):
- a Keras model with one input takes the tensor itself; with more, a dict keyed by the model's input
  names (its input dict's keys, else its Input tensors' names), which must be exactly the manifest's;
  a subclassed model, which names none, gets a dict keyed by the manifest's names;
- its outputs: a dict by its keys; a list by the model's `output_names` (name the output layers);
  one tensor whatever its name. Two or more outputs the model does not name fail;
- a SavedModel's serving signature takes its inputs by name: the manifest's names, or, for a
  one-input signature, whatever it is called; its outputs are matched by name, or by position where
  they are Keras' positional `output_0`, `output_1`... (what `model.export()` writes: the signature
  keeps no other name, so the manifest must list them in the model's order) or where there is one.
Anything else fails, listing what the model has.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Literal

from pydantic import Field, model_validator

from kiln.base.temps import final_name, temp_path
from kiln.errors import StepError, one_line
from kiln.schema.fields import FACTORY, CrossError, Strict
from kiln.sources.base import REFERENCE_TOOLS, Resolver, SourceKind, call_factory

if TYPE_CHECKING:
    from kiln.plan.chains import Planner
    from kiln.plan.steps import Step
    from kiln.rules import RunContext

SERVING_SIGNATURE = "serving_default"
SAVED_MODEL_FILE = "saved_model.pb"
KERAS_POSITIONAL_OUTPUT = re.compile(r"^output_(\d+)$")  # what Keras' model.export() names a model's outputs
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
        # the formats it can give are the spec's business: those with no source_frameworks (made from
        # its ONNX) and those made from a "tensorflow" model (kiln.define.spec)
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
        return load_keras_file(files[0])
    loaded = tf.saved_model.load(str(files[0].parent))
    if SERVING_SIGNATURE not in loaded.signatures:
        raise StepError("source", f"the SavedModel {files[0].parent.name!r} has no {SERVING_SIGNATURE!r} signature; it has {sorted(loaded.signatures)}")
    return loaded


def load_keras_file(path: Path):
    """A .keras file, safe_mode on (a Lambda layer's pickled Python code is refused, as kiln refuses
    pickle files). A custom class Keras cannot find is one line naming it, not Keras' config dump."""
    import keras

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # TypeError for an unknown class, ValueError for a refused Lambda...
        missing = missing_keras_class(err)
        if missing is None:
            raise StepError("source", f"keras cannot load {path.name}: {one_line(str(err))[:300]}") from None
        raise StepError("source", f"{path.name} uses the custom class {missing!r}, which Keras cannot find here; use source.factory = "
                                  "\"module:function\" with a function that imports the class and returns keras.saving.load_model(...) of the file") from None


def missing_keras_class(err: BaseException) -> str | None:
    """The class named by a "Could not locate class 'X'" anywhere in the exception's chain (Keras
    wraps it in a TypeError about the whole model's config)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        found = re.search(r"Could not locate class '([^']+)'", str(err))
        if found:
            return found.group(1)
        err = err.__cause__ or err.__context__
    return None


def require_float32(model, target: str) -> None:
    """Refuse a model that computes or stores weights below float32 (a Keras mixed_float16 or
    mixed_bfloat16 policy, float16 variables): an fp32 target made from it would compute in 16 bits
    and be gated by fp32's thresholds against a reference that computes in 16 bits too."""
    for layer in all_layers(model):
        compute = getattr(layer, "compute_dtype", None)
        if compute in ("float16", "bfloat16"):
            policy = getattr(getattr(layer, "dtype_policy", None), "name", compute)
            raise StepError("source", f"layer {layer.name!r} computes in {compute} (dtype policy {policy!r}); a {target} target is fp32: build the model under the 'float32' policy (keras.config.set_dtype_policy)")
    for variable in getattr(model, "variables", None) or []:
        dtype = getattr(variable.dtype, "name", str(variable.dtype))
        if dtype in ("float16", "bfloat16"):
            raise StepError("source", f"variable {variable.name!r} is {dtype}; a {target} target is fp32: save the model with float32 weights")


def all_layers(model) -> Iterator[Any]:
    """Every layer of a Keras model, those of nested models included (a loaded SavedModel has none)."""
    for layer in getattr(model, "layers", None) or []:
        yield layer
        yield from all_layers(layer)


def tensor_specs(inputs: list[dict]) -> list:
    """The manifest's inputs as TensorSpecs: named axes dynamic (None), integers fixed."""
    tf = import_tensorflow()
    return [tf.TensorSpec([d if isinstance(d, int) else None for d in t["shape"]], tf.as_dtype(t["dtype"]), name=t["name"]) for t in inputs]


def serving_function(model, inputs: list[dict], outputs: list[dict]):
    """(serve(*tensors in manifest order) -> {manifest output name: tensor}, its input signature) for
    the model; inputs and outputs meet the model's by name (module docstring)."""
    input_names = [t["name"] for t in inputs]
    output_names = [t["name"] for t in outputs]
    if hasattr(model, "signatures"):  # a loaded SavedModel: its serving signature, by name
        signature = model.signatures[SERVING_SIGNATURE]
        keys = signature_inputs(signature, input_names)

        def call(args):
            return signature(**dict(zip(keys, args, strict=True)))

        def name(result):
            return named_outputs(result, output_names)
    else:
        keys = keras_inputs(model, input_names)
        model_outputs = list(getattr(model, "output_names", None) or [])  # a subclassed model names none

        def call(args):
            if keys is None:
                return model(args[0], training=False)
            return model(dict(zip(keys, args, strict=True)), training=False)

        def name(result):
            return keras_outputs(result, output_names, model_outputs)

    def serve(*args):
        return name(call(args))

    return serve, tensor_specs(inputs)


def keras_inputs(model, names: list[str]) -> list[str] | None:
    """The keys to call a Keras model with, for the manifest's inputs in manifest order; None: one
    input, called with the tensor itself. Keras would take a list positionally (and a dict-input
    model a list with only a warning), so two or more go by name, never by position."""
    tensors = getattr(model, "inputs", None)
    if not tensors:  # a subclassed model: it names no inputs; a dict lets it read them by key (or fail)
        return None if len(names) == 1 else names
    try:
        structure = model.input  # a dict for a model built on a dict of Inputs: called by its keys
    except (AttributeError, ValueError):  # a Sequential model that was never called has none
        structure = None
    have = list(structure) if isinstance(structure, dict) else [t.name for t in tensors]
    if len(have) == 1 and len(names) == 1:
        return have if isinstance(structure, dict) else None
    if sorted(have) != sorted(names):
        raise StepError("source", f"the model takes inputs {have}; the manifest declares {names} (declare the model's input names: kiln feeds two or more inputs by name)")
    return names


def keras_outputs(result: Any, names: list[str], model_names: list[str]) -> dict:
    """A Keras model's result as {manifest output name: tensor}: a dict by its keys, a list by the
    model's output_names; one tensor whatever its name. Never by position for two or more."""
    if isinstance(result, dict):
        by_name = dict(result)
    else:
        values = list(result) if isinstance(result, (list, tuple)) else [result]
        if len(values) == len(names) == 1:
            return {names[0]: values[0]}
        if len(model_names) != len(values):
            raise StepError("source", f"the model returns {len(values)} unnamed outputs; the manifest declares {names} (kiln matches two or more outputs by name: name the model's output layers, or return a dict)")
        by_name = dict(zip(model_names, values, strict=True))
    if len(by_name) == len(names) == 1:
        return {names[0]: next(iter(by_name.values()))}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise StepError("source", f"the manifest declares output {missing[0]!r}, which the model does not have; its outputs are {list(by_name)} (declare the model's output names)")
    return {n: by_name[n] for n in names}


def signature_inputs(signature, names: list[str]) -> list[str]:
    """The signature's input names for the manifest's inputs, in manifest order."""
    _, by_name = signature.structured_input_signature
    have = sorted(by_name)
    if set(names) == set(have):
        return names
    if len(names) == len(have) == 1:
        return have
    raise StepError("source", f"the SavedModel's {SERVING_SIGNATURE} signature takes inputs {have}; the manifest declares {names}")


def named_outputs(result: dict, names: list[str]) -> dict:
    """A SavedModel signature's result as {manifest output name: tensor} (module docstring)."""
    keys = list(result)
    if all(name in result for name in names):
        return {name: result[name] for name in names}
    positional = sorted((int(m.group(1)), k) for k in keys if (m := KERAS_POSITIONAL_OUTPUT.match(k)))
    if len(positional) == len(keys) == len(names) and [i for i, _ in positional] == list(range(len(keys))):
        return {name: result[key] for name, (_, key) in zip(names, positional, strict=True)}
    if len(keys) == len(names) == 1:
        return {names[0]: result[keys[0]]}
    raise StepError("source", f"the model's outputs are {sorted(keys)}; the manifest declares {names} (name them as the model does)")


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


@contextmanager
def scratch_serving_savedmodel(source: dict[str, Any], files: list[Path], inputs: list[dict], outputs: list[dict], root: Path, output: Path) -> Iterator[Path]:
    """The serving SavedModel (export_serving) in a scratch folder beside the step's `output`, for a
    converter to read; deleted when the block ends. Its name is a kiln temp name of this process, so
    the sweep of a killed build's temps (kiln.base.temps) removes it when a kill skips the cleanup."""
    folder = temp_path(output.with_name(final_name(output)), "savedmodel")
    folder.mkdir()
    try:
        export_serving(source, files, inputs, outputs, root, folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
