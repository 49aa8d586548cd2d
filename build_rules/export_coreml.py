"""export_coreml: a PyTorch source -> a Core ML ML Program, model.mlpackage (a folder), by coremltools.

The source is traced (torch.jit.trace, via = "trace") or exported (torch.export + run_decompositions,
via = "torch_export") with the same example inputs as the other exports, then ct.convert'ed with
convert_to="mlprogram", the target's compute precision and minimum deployment target. Inputs and
outputs take the manifest's names; named dims become ct.RangeDim(1, bound) (one per name, shared by
every input that has it), int64 tensors int32 (kiln.formats.coreml says why).

Reproducible bytes: coremltools writes random item UUIDs into Manifest.json and the conversion date
into the model's metadata. The package is normalised after saving: the date dropped, model.mlmodel
re-serialised deterministically (protobuf maps in key order), each item's UUID derived from its path
and contents; coremltools then loads the package again (a normalisation that broke it fails here).
Runs in a fresh child (kiln.runtime.child): the tracer's and MIL's generated names come from
process-wide counters. Its noise (coremltools' "Torch version ... has not been tested", progress bars)
goes to the step's log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from kiln.base.temps import temp_path
from kiln.rules import TORCH_MODEL_MEMORY, Params, Rule, RunContext, register
from kiln.runtime.child import fail, in_fresh_stack, run_in_child

CONVERSION_DATE = "com.github.apple.coremltools.conversion_date"  # the one metadata entry that varies run to run


class ExportCoremlParams(Params):
    source: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    precision: Literal["fp32", "fp16"]
    minimum_deployment_target: str
    via: Literal["trace", "torch_export"] = "trace"
    max_sizes: dict[str, int] = {}  # every named dim of the inputs -> its upper bound


@register
class ExportCoreml(Rule):
    name = "export_coreml"
    version = 1
    tools = ("torch", "transformers", "coremltools")
    Params = ExportCoremlParams
    memory_base_mib, memory_per_input = TORCH_MODEL_MEMORY

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ExportCoremlParams, ctx: RunContext) -> dict[str, Any]:
        from kiln.sources.jobs import source_job

        out = outputs["model"]
        run_in_child(ctx.step, "kiln.build_rules.export_coreml:child_main", source_job(params, inputs, out, ctx.root), "coremltools could not convert the model")
        return {"via": params.via, "minimum_deployment_target": params.minimum_deployment_target, "bytes": _folder_bytes(out)}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def child_main() -> None:
    import shutil
    import tempfile

    from kiln.formats.coreml import import_coremltools
    from kiln.sources.jobs import read_source_job

    ct = import_coremltools()
    params, model, args, out = read_source_job(ExportCoremlParams)
    register_missing_torch_ops()
    # coremltools keeps its working package in the temp folder: a private one beside the output,
    # so nothing large is left in /tmp and the step's temp sweep owns it
    work = temp_path(out, "coreml")
    work.mkdir()
    tempfile.tempdir = str(work)
    try:
        try:
            program = in_fresh_stack(_trace, model, args) if params.via == "trace" else _export(model, args, params.inputs)
            mlmodel = ct.convert(program, inputs=core_ml_inputs(ct, params, args), outputs=[ct.TensorType(name=t["name"]) for t in params.outputs],
                                 convert_to="mlprogram", compute_precision=ct.precision.FLOAT16 if params.precision == "fp16" else ct.precision.FLOAT32,
                                 minimum_deployment_target=getattr(ct.target, params.minimum_deployment_target))
        except Exception as err:  # the tracer, torch.export and coremltools raise many types
            fail(err)
        saved = work / "model.mlpackage"  # coremltools insists on the .mlpackage suffix
        mlmodel.save(str(saved))
        del mlmodel  # its own working copy under `work` goes with it
        normalise_package(saved)
        ct.models.MLModel(str(saved), skip_model_load=True)  # still a package coremltools reads
        saved.rename(out)
    finally:
        tempfile.tempdir = None
        shutil.rmtree(work, ignore_errors=True)


def _trace(model, args):
    import warnings

    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        return torch.jit.trace(model, args, strict=False)


def _export(model, args, inputs: list[dict]):
    """torch.export with the named dims dynamic, decomposed to the core ATen ops coremltools reads."""
    import torch

    dynamic = tuple({axis: torch.export.Dim.DYNAMIC for axis, dim in enumerate(t.get("shape") or []) if isinstance(dim, str)} or None for t in inputs)
    with torch.no_grad():
        return torch.export.export(model, args, dynamic_shapes=(dynamic,), strict=False).run_decompositions({})


def core_ml_inputs(ct, params: ExportCoremlParams, args) -> list:
    """ct.TensorType per manifest input: its name, Core ML dtype (int64 -> int32) and shape, each
    named dim one RangeDim(1, bound) shared by every input that has it (default: the example's size)."""
    import numpy as np

    dtypes = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int32}
    ranges: dict[str, Any] = {}
    types = []
    for tensor, example in zip(params.inputs, args, strict=True):
        shape = []
        for axis, dim in enumerate(tensor.get("shape") or []):
            if isinstance(dim, str):
                if dim not in ranges:  # one symbol per name: coremltools refuses a symbol made twice
                    ranges[dim] = ct.RangeDim(lower_bound=1, upper_bound=params.max_sizes[dim], default=int(example.shape[axis]), symbol=dim)
                dim = ranges[dim]
            shape.append(dim)
        types.append(ct.TensorType(name=tensor["name"], shape=ct.Shape(shape), dtype=dtypes[tensor.get("dtype", "float32")]))
    return types


def normalise_package(package: Path) -> None:
    """Make the saved package's bytes a function of the model alone (see the module docstring)."""
    import hashlib
    import json
    import uuid

    from coremltools.proto import Model_pb2

    data = package / "Data"
    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for item in manifest["itemInfoEntries"].values():
        if item["path"].endswith(".mlmodel"):
            spec_path = data / item["path"]
            spec = Model_pb2.Model()
            spec.ParseFromString(spec_path.read_bytes())
            spec.description.metadata.userDefined.pop(CONVERSION_DATE, None)
            spec_path.write_bytes(spec.SerializeToString(deterministic=True))
    renamed = {}
    for identifier, item in manifest["itemInfoEntries"].items():
        digest = hashlib.sha256()
        for path in sorted(p for p in [data / item["path"], *(data / item["path"]).rglob("*")] if p.is_file()):
            digest.update(path.relative_to(data).as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        renamed[identifier] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"kiln-coreml:{item['path']}:{digest.hexdigest()}")).upper()
    manifest["itemInfoEntries"] = {renamed[k]: v for k, v in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


def register_missing_torch_ops() -> None:
    """transformers 5 models (and any model) may call Tensor.new_ones (attention masks), which
    coremltools 9 cannot convert from TorchScript: a fill of ones with the requested dtype (the tensor's own by default),
    as coremltools converts ones() and new_zeros(). Registered only where coremltools lacks it."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import NUM_TO_DTYPE_STRING, _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op
    from coremltools.converters.mil.mil import types

    if "new_ones" in _TORCH_OPS_REGISTRY:
        return

    def new_ones(context, node):
        import numpy as np

        inputs = _get_inputs(context, node)  # self, size, dtype, layout, device, pin_memory
        shape = inputs[1]
        dtype = inputs[2].val if len(inputs) > 2 and inputs[2] is not None and inputs[2].val is not None else None
        name = NUM_TO_DTYPE_STRING[dtype] if dtype is not None else types.builtin_to_string(inputs[0].dtype)
        name = "int32" if name.startswith(("int", "uint")) else name  # Core ML integers are int32
        if isinstance(shape, list):  # a dynamic size is a list of scalars
            shape = mb.concat(values=shape, axis=0)
        if shape.val is not None and np.asarray(shape.val).size == 0:  # new_ones([]): a scalar, which fill cannot make
            value = {"bool": np.bool_, "int32": np.int32, "fp16": np.float16}.get(name, np.float32)(1)
            context.add(mb.const(val=value, name=node.name))
            return
        shape = mb.cast(x=shape, dtype="int32") if types.builtin_to_string(shape.dtype) != "int32" else shape
        if name in ("bool", "fp32"):  # what fill makes itself
            context.add(mb.fill(shape=shape, value=True if name == "bool" else 1.0, name=node.name))
        else:
            context.add(mb.cast(x=mb.fill(shape=shape, value=1.0), dtype=name, name=node.name))

    register_torch_op(new_ones)
