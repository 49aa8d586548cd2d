"""export_coreml_tf: a TensorFlow source (a Keras model or a SavedModel) -> a Core ML ML Program,
model.mlpackage (a folder), by coremltools' TensorFlow 2 frontend.

coremltools is given one concrete function, not the Keras model: it reads a Keras 3 model through
tf.keras (which is Keras 3 here too) only by accident, and a SavedModel folder through every
signature it has. The function is the source's serving function (kiln.sources.tensorflow.
serving_function: the manifest's inputs as TensorSpecs, which name its placeholders, named axes
None, the model called in inference mode, its outputs met by name). coremltools names a package's
outputs after the graph nodes that compute them (the function's Identity, Identity_1...): they are
renamed to the manifest's names in the saved package (rename_outputs). coremltools freezes the variables
itself (convert_variables_to_constants_v2). Layout: the source's (NHWC for Keras images); the
transposes Core ML's convolutions need are coremltools' own, inside the program.

The rest is the torch path's (build_rules/export_coreml.py): convert_to="mlprogram", the target's
compute precision and minimum deployment target, named dims as ct.RangeDim(1, bound) shared by name,
int64 tensors as int32, outputs typed as the manifest's (core_ml_inputs, core_ml_outputs), and
the same normalisation for reproducible bytes (normalise_package). A TensorFlow op coremltools has no conversion for fails the step in one line
naming the op and the graph node. An fp32 target from a model that computes in float16 (a Keras
mixed precision policy) is refused, as for the savedmodel format.

What the package computes cannot be checked off macOS (no Core ML runtime): the function converted
is the one the reference outputs come from (run_reference), with dynamic axes, so no trace fixes a
shape; the validate step's structural check covers names, shapes, dtypes, weights and op set.
Runs in a fresh child (kiln.runtime.child): TF's graph and MIL's generated names come from
process-wide counters; two exports are byte-identical.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from kiln.base.temps import temp_path
from kiln.errors import StepError
from kiln.build_rules.export_coreml import CoremlParams
from kiln.rules import Rule, RunContext, register
from kiln.runtime.child import fail, read_job, run_in_child

# coremltools' NotImplementedError for a TF op without a converter: "Conversion for TF op 'X' not implemented.\n \n<node def>"
UNCONVERTED_OP = re.compile(r"Conversion for TF op '([^']+)' not implemented")
NODE_NAME = re.compile(r'name: "([^"]+)"')


class ExportCoremlTfParams(CoremlParams):
    """The torch export's settings without `via`: TensorFlow has one way in (the serving function)."""


@register
class ExportCoremlTf(Rule):
    name = "export_coreml_tf"
    version = 1
    tools = ("tensorflow", "tensorflow-cpu", "keras", "coremltools")
    Params = ExportCoremlTfParams
    memory_base_mib, memory_per_input = 1536, 4.0  # TensorFlow, coremltools and the frozen graph's copies

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ExportCoremlTfParams, ctx: RunContext) -> dict[str, Any]:
        from kiln.build_rules.export_coreml import _folder_bytes
        from kiln.sources.jobs import source_job

        out = outputs["model"]
        run_in_child(ctx.step, "kiln.build_rules.export_coreml_tf:child_main", source_job(params, inputs, out, ctx.root), "coremltools could not convert the model")
        return {"via": "tf_concrete_function", "minimum_deployment_target": params.minimum_deployment_target, "bytes": _folder_bytes(out)}


def child_main() -> None:
    import tempfile

    from kiln.build_rules.export_coreml import core_ml_inputs, core_ml_outputs, normalise_package
    from kiln.formats.coreml import import_coremltools
    from kiln.sources.tensorflow import import_tensorflow, load_model, require_float32

    job = read_job()
    params = ExportCoremlTfParams(**job["params"])
    tf = import_tensorflow()
    ct = import_coremltools(tensorflow=True)
    model = load_model(params.source, [Path(f) for f in job["files"]], Path(job["root"]))
    if params.precision == "fp32":
        require_float32(model, "coreml fp32")  # else an "fp32" package would compute in float16
    function, output_nodes = serving_concrete_function(tf, model, params)
    out = Path(job["out"])
    # coremltools keeps its working package in the temp folder: a private one beside the output
    # (export_coreml.py says why)
    work = temp_path(out, "coreml")
    work.mkdir()
    tempfile.tempdir = str(work)
    try:
        try:
            mlmodel = ct.convert([function], source="tensorflow", inputs=core_ml_inputs(ct, params, example_arrays(params)),
                                 outputs=core_ml_outputs(ct, params.outputs, list(output_nodes)), convert_to="mlprogram",
                                 compute_precision=ct.precision.FLOAT16 if params.precision == "fp16" else ct.precision.FLOAT32,
                                 minimum_deployment_target=getattr(ct.target, params.minimum_deployment_target))
        except Exception as err:  # coremltools raises many types
            unconverted = unconverted_op(err)
            if unconverted:
                raise StepError("source", unconverted) from None
            fail(err)
        saved = work / "model.mlpackage"  # coremltools insists on the .mlpackage suffix
        mlmodel.save(str(saved))
        del mlmodel
        rename_outputs(saved, output_nodes)
        normalise_package(saved)
        ct.models.MLModel(str(saved), skip_model_load=True)  # still a package coremltools reads
        saved.rename(out)
    finally:
        tempfile.tempdir = None
        shutil.rmtree(work, ignore_errors=True)


def serving_concrete_function(tf, model, params: ExportCoremlTfParams):
    """(the serving function as a concrete function, {its output's graph node: the manifest's
    output name}). coremltools takes outputs by graph node, and TF's optimiser (grappler, which
    coremltools runs) keeps only the function's own output nodes, Identity, Identity_1...: named
    identities inside the function are optimised away. The package's outputs are renamed afterwards
    (rename_outputs)."""
    from kiln.sources.tensorflow import serving_function

    serve, specs = serving_function(model, params.inputs, params.outputs)
    function = tf.function(serve, input_signature=specs).get_concrete_function()
    nodes = {function.structured_outputs[t["name"]].name.split(":")[0]: t["name"] for t in params.outputs}
    placeholders = [t.name.split(":")[0] for t in function.inputs if t.dtype != tf.resource]
    if placeholders != [t["name"] for t in params.inputs]:  # TensorSpec names become the placeholders'; TF would suffix a clash
        raise StepError("source", f"the serving function's inputs are {placeholders}; the manifest declares {[t['name'] for t in params.inputs]}")
    return function, nodes


def rename_outputs(package: Path, names: dict[str, str]) -> None:
    """Rename the package's outputs (description and ML Program, nested blocks included) from graph
    node names to the manifest's. A manifest name that is already a variable of the program would
    give two variables one name: refused, naming it."""
    from coremltools.proto import Model_pb2

    (path,) = (package / "Data").rglob("*.mlmodel")
    spec = Model_pb2.Model()
    spec.ParseFromString(path.read_bytes())
    taken = {name for function in spec.mlProgram.functions.values() for block in function.block_specializations.values() for name in _block_names(block)}
    for old, new in names.items():
        if new != old and new in taken:
            raise StepError("source", f"output {new!r}: the converted program already has a variable named {new!r} (from the model's graph); rename the output")
    for feature in spec.description.output:
        feature.name = names.get(feature.name, feature.name)
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            _rename_in_block(block, names)
    path.write_bytes(spec.SerializeToString())


def _block_names(block) -> set[str]:
    """Every variable a block (and the blocks inside its ops) defines or reads."""
    names = {v.name for v in block.inputs} | set(block.outputs)
    for op in block.operations:
        names |= {v.name for v in op.outputs}
        names |= {b.name for argument in op.inputs.values() for b in argument.arguments if b.HasField("name")}
        for inner in op.blocks:
            names |= _block_names(inner)
    return names


def _rename_in_block(block, names: dict[str, str]) -> None:
    for i, name in enumerate(block.outputs):
        block.outputs[i] = names.get(name, name)
    for op in block.operations:
        for value in op.outputs:
            value.name = names.get(value.name, value.name)
        for argument in op.inputs.values():
            for binding in argument.arguments:
                if binding.HasField("name"):
                    binding.name = names.get(binding.name, binding.name)
        for inner in op.blocks:
            _rename_in_block(inner, names)


def example_arrays(params: ExportCoremlTfParams) -> tuple:
    """Seeded example inputs (kiln.runtime.data.example_inputs) in manifest order, each named dim at
    its usual example size within its bound: each RangeDim's default, the shape the package's
    description shows."""
    from kiln.runtime.data import example_inputs

    sizes = {dim: min(2 if dim == "batch" else 8, bound) for dim, bound in params.max_sizes.items()}
    example = example_inputs(params.inputs, sizes=sizes)
    return tuple(example[t["name"]] for t in params.inputs)


def unconverted_op(err: BaseException) -> str | None:
    """One line naming the TensorFlow op (and its graph node) coremltools has no conversion for."""
    found = UNCONVERTED_OP.search(str(err))
    if not found:
        return None
    node = NODE_NAME.search(str(err))
    where = f" (graph node {node.group(1)!r})" if node else ""
    return f"coremltools {_version()} has no Core ML conversion for TensorFlow op {found.group(1)!r}{where}; replace the layer that uses it"


def _version() -> str:
    import coremltools

    return coremltools.__version__
