"""format = "coreml": a Core ML ML Program (model.mlpackage, a folder) converted by coremltools from
the source nn.Module (traced, or torch.export: build_rules/export_coreml.py) or from a TensorFlow
source's serving function (a Keras model or a SavedModel, inputs in the source's layout, NHWC for
Keras images: build_rules/export_coreml_tf.py), at fp32 or fp16 compute precision, for the
manifest's minimum deployment target. Needs `pip install 'kiln[coreml]'`.

Core ML runs only on Apple platforms (coremltools' Linux wheels ship no runtime and there is no MIL
interpreter), so validation has two modes:
- macOS with coremltools' native runtime: the package runs through MLModel.predict (CPU only, for
  reproducible numbers) and is compared with the reference outputs like every other format;
- anywhere else: a structural check of the package (it parses; inputs and outputs have the
  manifest's names, dtypes and shapes, dynamic axes as declared ranges; the spec version, the ML
  Program opset and every op are within the deployment target's; every weight is stored at the
  target's precision; every weight blob and every Manifest.json item is in the package), then StructuralOnly: the artifact is
  published with validation.json saying "validated": "structural" and which checks passed, never
  metrics. Any structural mismatch fails the step, naming the tensor. What the package computes is
  checked before conversion instead (export_coreml runs the trace against the source in torch at
  the example's and at other sizes; a TensorFlow source's converted function is the reference's own,
  with dynamic axes, so nothing was specialised to an example).
Whether Core ML runs here is in the validate step's key (Validate.hardware_for ->
validation_hardware): a structural result from Linux is not up to date on a Mac ("hardware changed").

Decisions (README, manifest reference):
- Dynamic axes (named dims) become ct.RangeDim(1, max_size): coremltools refuses unbounded ranges
  for ML Programs, so each named dim has an upper bound, `max_sizes = { batch = 64 }`, default
  DEFAULT_MAX_SIZE, or for a Hugging Face model's text length (named dims of its token inputs other
  than the batch) the positions its config.json has. Dims with the same name share one RangeDim (one
  symbol across inputs). A text-length bound below validation.max_length is refused at check time
  (against the manifest's max_length, the default 128 included: the positions that may cut it are
  known only after resolve).
- Core ML tensors are float32, float16 (iOS16 / macOS13 and later) or int32. An int64 input or
  output (token ids, class indices) is int32 in the package: ids fit, and coremltools casts int64
  to int32 anyway; the macOS runner feeds int64 data as int32 (refusing values that do not fit).
  Other dtypes (float64, bfloat16, int8, uint8, bool) are refused at check time.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from kiln.errors import StepError, one_line
from kiln.formats.base import TargetFormat
from kiln.runtime.runners import Artifact, Runner, StructuralOnly, require_outputs
from kiln.schema.fields import BATCH, CrossError, TargetBase
from kiln.sources import source_kind

if TYPE_CHECKING:
    from kiln.plan.chains import Planner

# coremltools' ct.target names that an ML Program can be built for (specification version 6 = iOS15
# and later; older ones are neural-network only), with their specification versions.
# tests/formats/test_coreml.py checks this against the installed coremltools.
DEPLOYMENT_TARGETS: dict[str, int] = {
    "iOS15": 6, "iOS16": 7, "iOS17": 8, "iOS18": 9, "iOS26": 10,
    "macOS12": 6, "macOS13": 7, "macOS14": 8, "macOS15": 9, "macOS26": 10,
    "watchOS8": 6, "watchOS9": 7, "watchOS10": 8, "watchOS11": 9, "watchOS26": 10,
    "tvOS15": 6, "tvOS16": 7, "tvOS17": 8, "tvOS18": 9, "tvOS26": 10,
}
DeploymentTarget = Literal[tuple(DEPLOYMENT_TARGETS)]  # type: ignore[valid-type]
# coremltools' own default for ML Programs: the oldest target they run on, so the widest reach.
DEFAULT_DEPLOYMENT_TARGET = "iOS15"
# The upper bound of a dynamic axis that max_sizes does not name. ML Programs need one; 1024 covers
# common batch and sequence sizes. Core ML plans memory for ranges lazily, so a generous bound costs
# nothing until a large input comes.
DEFAULT_MAX_SIZE = 1024
FLOAT16_IO_VERSION = 7  # float16 inputs and outputs: iOS16 / macOS13 and later
# Manifest dtype -> the Core ML multi-array dtype that carries it.
TENSOR_DTYPES = {"float32": "FLOAT32", "float16": "FLOAT16", "int32": "INT32", "int64": "INT32"}
# How each target precision stores the weights (MIL const tensors).
WEIGHT_DTYPES = {"fp32": "FLOAT32", "fp16": "FLOAT16"}
STRUCTURAL_ONLY = "structural check only: Core ML needs macOS to run"


class CoremlTarget(TargetBase):
    """A Core ML ML Program (model.mlpackage) converted by coremltools; validated with
    MLModel.predict on macOS, structurally checked elsewhere (Core ML runs only on Apple platforms)."""

    format: Literal["coreml"]
    precision: Literal["fp32", "fp16"] = Field("fp32", description="compute precision: fp16 stores weights and computes in float16 (inputs and outputs stay as declared)")
    minimum_deployment_target: DeploymentTarget = Field(DEFAULT_DEPLOYMENT_TARGET, description="the oldest OS the package runs on (coremltools' ct.target); it bounds the spec version and the op set")  # type: ignore[valid-type]
    via: Literal["trace", "torch_export"] = Field("trace", description="how coremltools reads the model: a torch.jit.trace, or a torch.export program (run_decompositions)")
    max_sizes: dict[Annotated[str, Field(pattern=r"^[A-Za-z_]\w*$")], Annotated[int, Field(ge=1)]] = Field(
        {}, description=f"upper bound of each named (dynamic) dimension of the inputs; unnamed ones: {DEFAULT_MAX_SIZE} (ML Programs need a bound)")


class Coreml(TargetFormat):
    format = "coreml"
    Target = CoremlTarget
    extra = ("coremltools", "coreml")
    # from the model itself: the nn.Module (build_rules/export_coreml.py) or the TensorFlow source's
    # serving function (build_rules/export_coreml_tf.py)
    source_frameworks = frozenset({"torch", "tensorflow"})
    validation_tools = ("coremltools",)

    def check(self, spec: Any, name: str, target: CoremlTarget) -> None:
        version = DEPLOYMENT_TARGETS[target.minimum_deployment_target]
        for group in ("inputs", "outputs"):
            for i, tensor in enumerate(getattr(spec, group)):
                _check_tensor(f"{group}[{i}]", tensor, name, target, version)
        dims = named_dims(spec.inputs)
        for dim in target.max_sizes:
            if dim not in dims:
                raise CrossError(f"targets.{name}.max_sizes", dim, f"a named dimension of the inputs: {sorted(dims)}")
        if BATCH in dims and spec.validation.batch_size > max_size(target, BATCH):
            raise CrossError(f"targets.{name}.max_sizes", dict(target.max_sizes), f"a {BATCH!r} bound of at least validation.batch_size ({spec.validation.batch_size}): validation feeds whole batches")
        _check_text_length(spec, name, target)
        if "via" in target.model_fields_set and source_kind(spec.source.kind).framework != "torch":
            raise CrossError(f"targets.{name}.via", target.via, f"no via for a {spec.source.kind} source (coremltools converts its serving function; via picks how a PyTorch model is read)")
        if spec.source.kind == "huggingface" and target.via == "torch_export":
            raise CrossError(f"targets.{name}.via", target.via, "\"trace\" for a huggingface source: coremltools cannot convert the masks transformers' models torch.export to (unsupported fx node __and__)")

    def chain(self, planner: Planner, name: str, target: CoremlTarget) -> None:
        reference = planner.reference(name)
        params = {"source": planner.source_params, "inputs": planner.inputs, "outputs": planner.outputs} | conversion_params(planner.spec, target, planner.resolved.text_positions)
        rule = "export_coreml" if planner.source.framework == "torch" else "export_coreml_tf"
        package = planner.add(name, rule, params, {"source": planner.resolved.source_files}, {"model": "model.mlpackage"})
        planner.validate(name, target, package.outputs["model"], package, reference)

    def validation(self, planner: Planner, name: str, target: CoremlTarget) -> tuple[dict, dict]:
        """The structural check compares the package with the manifest's tensors and the deployment
        target; the macOS runner feeds the inputs by name."""
        options = {k: v for k, v in conversion_params(planner.spec, target, planner.resolved.text_positions).items() if k != "precision"}
        return {"inputs": planner.inputs, "output_specs": planner.outputs, "format_options": options}, {}

    def validation_hardware(self) -> dict[str, str]:
        """For the validate step's key (Validate.hardware_for): whether Core ML itself runs here."""
        return {"coreml_runtime": runtime_name()}

    def open_runner(self, artifact: Artifact) -> Runner:
        """The structural check always; then MLModel.predict where Core ML exists (macOS), else
        StructuralOnly with the checks that passed."""
        ct = import_coremltools()
        checks = structural_check(ct, artifact)
        if not native_runtime():
            raise StructuralOnly(STRUCTURAL_ONLY, checks)
        return predict_runner(ct, artifact)  # pragma: no cover - macOS only


def _check_tensor(key: str, tensor: Any, name: str, target: CoremlTarget, version: int) -> None:
    """An input needs a shape (ct.TensorType's); an output's shape is checked when declared."""
    if key.startswith("inputs") and not tensor.shape:
        raise CrossError(f"{key}.shape", tensor.shape, f"a shape with at least one axis: a Core ML tensor has a fixed rank (targets.{name} is coreml)")
    if tensor.dtype not in TENSOR_DTYPES:
        raise CrossError(f"{key}.dtype", tensor.dtype, f"float32, float16, int32 or int64 (as int32): the dtypes a Core ML tensor has (targets.{name} is coreml)")
    if tensor.dtype == "float16" and version < FLOAT16_IO_VERSION:
        raise CrossError(f"targets.{name}.minimum_deployment_target", target.minimum_deployment_target, f"iOS16 / macOS13 or later: {key} is float16, which older Core ML cannot take")


def named_dims(inputs: list) -> list[str]:
    """The inputs' dynamic axes, each name once, in order of appearance."""
    return list(dict.fromkeys(d for t in inputs for d in (t.shape or []) if isinstance(d, str)))


def max_size(target: CoremlTarget, dim: str, default: int = DEFAULT_MAX_SIZE) -> int:
    return target.max_sizes.get(dim, default)


def sequence_dims(spec: Any) -> list[str]:
    """The named dims of a Hugging Face source's token inputs (input_ids, attention_mask,
    token_type_ids) other than the batch: the length of the text, which the model has positions for."""
    from kiln.sources.huggingface import TEXT_INPUTS

    if spec.source.kind != "huggingface":
        return []
    return list(dict.fromkeys(d for t in spec.inputs if t.name in TEXT_INPUTS for d in (t.shape or []) if isinstance(d, str) and d != BATCH))


def _check_text_length(spec: Any, name: str, target: CoremlTarget) -> None:
    """Text validation data is tokenized up to validation.max_length tokens; a text-length bound
    below that gives a package that refuses the longer lines (and off macOS nothing would run them).
    Checked against the max_length the manifest gives (the default too): the model's positions,
    which may cut it further, are known only once the source is resolved. Calibration data never
    reaches a Core ML package (it has no int8), so only validation counts."""
    if not str(spec.validation.data).endswith(".txt"):
        return
    for dim in sequence_dims(spec):
        if dim in target.max_sizes and target.max_sizes[dim] < spec.validation.max_length:
            raise CrossError(f"targets.{name}.max_sizes", dict(target.max_sizes),
                             f"a {dim!r} bound of at least validation.max_length ({spec.validation.max_length}): text is fed up to that many tokens (or set validation.max_length = {target.max_sizes[dim]})")


def conversion_params(spec: Any, target: CoremlTarget, text_positions: int | None = None) -> dict[str, Any]:
    """What the export step needs besides the source: every named dim's bound, defaults filled in,
    so the params say exactly what the package accepts. A Hugging Face model's text length defaults
    to the positions it has (text_positions, from its config.json) rather than DEFAULT_MAX_SIZE:
    longer text is what the model itself cannot take."""
    text = set(sequence_dims(spec)) if text_positions else set()
    via = {"via": target.via} if source_kind(spec.source.kind).framework == "torch" else {}  # a TensorFlow source has one way in
    return {"precision": target.precision, "minimum_deployment_target": target.minimum_deployment_target, **via,
            "max_sizes": {dim: max_size(target, dim, text_positions if dim in text else DEFAULT_MAX_SIZE) for dim in named_dims(spec.inputs)}}


# ---- coremltools ---------------------------------------------------------------------------------


def import_coremltools(tensorflow: bool = False):
    """coremltools, imported without TensorFlow unless asked: coremltools imports TensorFlow
    whenever it is installed (4 s and C++ log lines), though a torch conversion or a structural check
    never uses it. Hidden only while coremltools loads and only if nothing imported it yet, so a later
    `import tensorflow` in this process still works (only coremltools' own TF converter is off)."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    hide = not tensorflow and "coremltools" not in sys.modules and "tensorflow" not in sys.modules
    if hide:
        sys.modules["tensorflow"] = None  # type: ignore[assignment]  # makes `import tensorflow` raise ImportError
    try:
        import coremltools as ct
    finally:
        if hide:
            del sys.modules["tensorflow"]
    return ct


def native_runtime() -> bool:
    """Whether Core ML itself can run here: macOS with coremltools' compiled proxy."""
    if sys.platform != "darwin":
        return False
    try:
        from coremltools import libcoremlpython  # noqa: F401
    except ImportError:
        return False
    return True


def runtime_name() -> str:
    """"macOS <version>" where Core ML runs (native_runtime), else "none (<platform>)"."""
    import platform

    return f"macOS {platform.mac_ver()[0]}" if native_runtime() else f"none ({sys.platform})"


# ---- the structural check ------------------------------------------------------------------------


def structural_check(ct, artifact: Artifact) -> dict[str, Any]:
    """Everything about the package that can be checked without running it; returns what was checked
    (for validation.json), raises StepError naming the tensor, op or weight that does not match."""
    step, path = artifact.step, artifact.path
    options = artifact.options or {}
    wanted = options.get("minimum_deployment_target", DEFAULT_DEPLOYMENT_TARGET)
    items = _check_manifest_items(path, step)
    try:
        spec = ct.utils.load_spec(str(path))
    except Exception as err:  # coremltools raises Exception, KeyError, protobuf DecodeError...
        raise StepError(step, f"coremltools cannot load {path.name}: {one_line(err)[:300]}") from None
    if spec.WhichOneof("Type") != "mlProgram":
        raise StepError(step, f"{path.name} holds a {spec.WhichOneof('Type')} model, not an ML Program")
    function_name = spec.description.defaultFunctionName or "main"
    function = spec.mlProgram.functions[function_name]
    ops = list(_operations(function.block_specializations[function.opset].operations))
    dims = options.get("max_sizes", {})
    return {
        "package": f"loads: specification version {spec.specificationVersion}, ML Program opset {function.opset}; {items}",
        "deployment_target": _check_versions(ct, spec, function, ops, wanted, step),
        "inputs": _check_inputs(spec, artifact.inputs or [], dims, step),
        "outputs": _check_outputs(spec, function.block_specializations[function.opset], artifact.output_specs or [], step),
        "weights": _check_weights(ops, path, artifact.precision, step),
    }


def _check_manifest_items(package: Path, step: str) -> str:
    """Every item Manifest.json lists is in the package: Core ML refuses a package with one missing
    ("Item does not exist for identifier"), e.g. an empty weights folder lost by a copy that drops
    empty folders. A Manifest.json that does not parse is left to load_spec to report."""
    import json

    try:
        items = json.loads((package / "Manifest.json").read_text()).get("itemInfoEntries") or {}
    except (OSError, ValueError, AttributeError):
        return "Manifest.json unreadable"
    for item in items.values():
        if not (package / "Data" / item.get("path", "")).exists() or not item.get("path"):
            raise StepError(step, f"{package.name}'s Manifest.json lists item {item.get('path')!r} ({item.get('description', item.get('name'))}), which the package does not hold; Core ML refuses such a package")
    return f"its {len(items)} Manifest.json items present"


def _operations(operations):
    """Every op of a block, nested blocks (cond, while_loop bodies) included."""
    for op in operations:
        yield op
        for block in op.blocks:
            yield from _operations(block.operations)


def _check_versions(ct, spec, function, ops, wanted: str, step: str) -> str:
    """The spec version, the program's opsets and every op exist on the deployment target."""
    from coremltools.converters.mil.mil.ops import defs  # noqa: F401  # registers the ops of every opset
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    version = DEPLOYMENT_TARGETS[wanted]
    if spec.specificationVersion > version:
        raise StepError(step, f"the package has specification version {spec.specificationVersion}; minimum_deployment_target {wanted} reads up to {version}")
    opsets = {name: v for v, name in ct._OPSET.items()}  # "CoreML5" -> 6
    for opset in function.block_specializations:
        if opsets.get(opset, version + 1) > version:
            raise StepError(step, f"the program uses opset {opset}, which {wanted} does not have (it has up to {ct._OPSET.get(version)})")
    counts: dict[str, int] = {}
    for op in ops:
        counts[op.type] = counts.get(op.type, 0) + 1
    for op_type in sorted(counts):
        introduced = [t.value for t in SSAOpRegistry.core_ops.get(op_type, {})]
        if not introduced or min(introduced) > version:
            raise StepError(step, f"op {op_type!r} is not in {wanted}'s Core ML op set" + (f" (it needs specification version {min(introduced)})" if introduced else ""))
    return f"specification version {spec.specificationVersion} and {sum(counts.values())} ops ({len(counts)} types) within {wanted}'s (version {version})"


def _ranges(array_type) -> list[tuple[int, int]]:
    """Each axis of a Core ML multi-array input as (lowest, highest) size; -1: unbounded."""
    if array_type.WhichOneof("ShapeFlexibility") == "shapeRange":
        return [(r.lowerBound, r.upperBound) for r in array_type.shapeRange.sizeRanges]
    if array_type.WhichOneof("ShapeFlexibility") == "enumeratedShapes":
        shapes = [list(s.shape) for s in array_type.enumeratedShapes.shapes]
        return [(min(s[i] for s in shapes), max(s[i] for s in shapes)) for i in range(len(shapes[0]))] if shapes else []
    return [(n, n) for n in array_type.shape]


def _described(features, kind: str, step: str) -> dict[str, Any]:
    """The package's inputs or outputs by name, each a multi-array (Core ML tensors are)."""
    found = {}
    for feature in features:
        if feature.type.WhichOneof("Type") != "multiArrayType":
            raise StepError(step, f"{kind} {feature.name!r} of the package is a {feature.type.WhichOneof('Type')}, not a multi-array")
        found[feature.name] = feature.type.multiArrayType
    return found


def _same_names(found: dict, declared: list[dict], kind: str, step: str) -> None:
    names = [t["name"] for t in declared]
    for name in names:
        if name not in found:
            raise StepError(step, f"{kind} {name!r} is not in the Core ML package; it has {sorted(found)}")
    extra = sorted(set(found) - set(names))
    if extra:
        raise StepError(step, f"the Core ML package has {kind} {extra[0]!r}, which the manifest does not declare ({names})")


def _dtype_name(array_type) -> str:
    from coremltools.proto import FeatureTypes_pb2

    return FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(array_type.dataType)


def _check_dtype(name: str, kind: str, array_type, tensor: dict, step: str) -> str:
    want = TENSOR_DTYPES[tensor.get("dtype", "float32")]
    got = _dtype_name(array_type)
    if got != want:
        raise StepError(step, f"{kind} {name!r} is {got} in the Core ML package; the manifest's {tensor.get('dtype', 'float32')} is {want} in Core ML")
    return got


def _check_inputs(spec, declared: list[dict], max_sizes: dict[str, int], step: str) -> dict[str, str]:
    """Names, dtypes and shapes: fixed axes fixed at the manifest's size, named axes 1..their bound."""
    found = _described(spec.description.input, "input", step)
    _same_names(found, declared, "input", step)
    checked = {}
    for tensor in declared:
        name, shape = tensor["name"], tensor.get("shape") or []
        array_type = found[name]
        dtype = _check_dtype(name, "input", array_type, tensor, step)
        ranges = _ranges(array_type)
        if len(ranges) != len(shape):
            raise StepError(step, f"input {name!r} has rank {len(ranges)} in the Core ML package; the manifest declares {shape}")
        for axis, (dim, got) in enumerate(zip(shape, ranges, strict=True)):
            want = (dim, dim) if isinstance(dim, int) else (1, max_sizes.get(dim, DEFAULT_MAX_SIZE))
            if got != want:
                raise StepError(step, f"input {name!r} axis {axis} takes {_span(got)} in the Core ML package; the manifest's {dim!r} means {_span(want)}")
        checked[name] = f"{dtype} [{', '.join(_span(r) for r in ranges)}]"
    return checked


def _span(bounds: tuple[int, int]) -> str:
    low, high = bounds
    return str(low) if low == high else f"{low}..{'unbounded' if high < 0 else high}"


def _check_outputs(spec, block, declared: list[dict], step: str) -> dict[str, str]:
    """Names and dtypes from the description; shapes from the program's types (ML Program
    descriptions leave output shapes out): fixed axes at the manifest's size, named axes dynamic."""
    found = _described(spec.description.output, "output", step)
    _same_names(found, declared, "output", step)
    types = {out.name: out.type for op in block.operations for out in op.outputs}
    checked = {}
    for tensor in declared:
        name, shape = tensor["name"], tensor.get("shape")
        dtype = _check_dtype(name, "output", found[name], tensor, step)
        program_type = types.get(name)
        if program_type is None or program_type.WhichOneof("type") != "tensorType":
            raise StepError(step, f"output {name!r} is not a tensor the program computes")
        dims = [d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in program_type.tensorType.dimensions]
        if shape is not None:
            if len(dims) != len(shape):
                raise StepError(step, f"output {name!r} has rank {len(dims)} in the Core ML program; the manifest declares {shape}")
            for axis, (dim, got) in enumerate(zip(shape, dims, strict=True)):
                if isinstance(dim, int) and got is not None and got != dim:
                    raise StepError(step, f"output {name!r} axis {axis} is {got} in the Core ML program; the manifest declares {dim}")
                if isinstance(dim, str) and got is not None:
                    raise StepError(step, f"output {name!r} axis {axis} is fixed at {got} in the Core ML program; the manifest's {dim!r} is dynamic")
        checked[name] = f"{dtype} [{', '.join('?' if d is None else str(d) for d in dims)}]"
    return checked


def _check_weights(ops, package: Path, precision: str | None, step: str) -> str:
    """Every float weight (a const or constexpr tensor with at least one axis; scalars are op
    parameters) is stored at the target's precision, and every weight blob is in the package."""
    from coremltools.proto import MIL_pb2

    want = WEIGHT_DTYPES.get(precision or "")
    count = values = 0
    for op in ops:
        if op.type != "const" and not op.type.startswith("constexpr_"):
            continue
        tensor = op.outputs[0].type.tensorType if op.outputs[0].type.WhichOneof("type") == "tensorType" else None
        if tensor is None or tensor.rank < 1:
            continue
        dtype = MIL_pb2.DataType.Name(tensor.dataType)
        if dtype not in ("FLOAT16", "FLOAT32", "BFLOAT16", "FLOAT64"):
            continue
        if want is not None and dtype != want:
            raise StepError(step, f"weight {op.outputs[0].name!r} is {dtype} in the Core ML package; a {precision} target stores its weights as {want}")
        _check_blob(op, package, step)
        count += 1
        size = 1
        for d in tensor.dimensions:
            size *= d.constant.size if d.WhichOneof("dimension") == "constant" else 1
        values += size
    return f"{count} weight tensors ({values} values), all {want or 'float'}"


def _check_blob(op, package: Path, step: str) -> None:
    """A weight stored in a blob file names a file of the package and an offset inside it."""
    for value in op.attributes.values():
        if value.WhichOneof("value") != "blobFileValue":
            continue
        name = value.blobFileValue.fileName.removeprefix("@model_path/")
        blob = package / "Data" / "com.apple.CoreML" / name
        if not blob.is_file() or value.blobFileValue.offset >= blob.stat().st_size:
            raise StepError(step, f"weight {op.outputs[0].name!r} points at {name} offset {value.blobFileValue.offset}, which the package does not hold")


# ---- macOS: Core ML itself -----------------------------------------------------------------------


def predict_runner(ct, artifact: Artifact) -> Runner:  # pragma: no cover - needs macOS's Core ML
    """MLModel.predict on the CPU (the GPU and Neural Engine round differently from one machine to the
    next; CPU numbers are reproducible), inputs fed by name, int64 data as int32. Written against
    coremltools' documented API; it cannot run on the Linux machines kiln is tested on, so its test
    (tests/formats/test_coreml.py) is skipped there."""
    import numpy as np

    try:
        model = ct.models.MLModel(str(artifact.path), compute_units=ct.ComputeUnit.CPU_ONLY)
    except Exception as err:  # Core ML raises its own errors for a package it cannot compile
        raise StepError(artifact.step, f"Core ML cannot load {artifact.path.name}: {one_line(err)[:300]}") from None
    dtypes = {t["name"]: t.get("dtype", "float32") for t in artifact.inputs or []}
    names = artifact.outputs

    def run(feed: dict) -> dict:
        fed = {}
        for name, dtype in dtypes.items():
            value = feed[name]
            if dtype == "int64":
                if value.size and (value.min() < np.iinfo(np.int32).min or value.max() > np.iinfo(np.int32).max):
                    raise StepError(artifact.step, f"input {name!r} holds values outside int32, which Core ML's int32 input cannot take")
                value = value.astype(np.int32)
            fed[name] = value
        result = model.predict(fed)
        require_outputs(set(result), names, "Core ML", artifact.step)
        return {name: np.asarray(result[name]) for name in names}

    return run
