"""export_coreml: a PyTorch source -> a Core ML ML Program, model.mlpackage (a folder), by coremltools.

The source is traced (torch.jit.trace, via = "trace") or exported (torch.export + run_decompositions,
via = "torch_export") with the same example inputs as the other exports, then ct.convert'ed with
convert_to="mlprogram", the target's compute precision and minimum deployment target. Inputs and
outputs take the manifest's names; named dims become ct.RangeDim(1, bound) (one per name, shared by
every input that has it), int64 tensors int32 (kiln.formats.coreml says why).

Checked in torch before conversion (Core ML cannot run off macOS, so this is what checks the
package's function there): the traced or exported program is run against the source nn.Module on
the example and on inputs whose named dims all have another size within their bound (the example's
values repeated); a trace fixed to the example's shapes (int(x.shape[1]), a Python branch on a size)
fails the step in one line naming the size, the difference and the tracer's first warning (all of
them are in the step's log). The sizes checked are the report's "trace_checked_at".

Reproducible bytes: coremltools writes random item UUIDs into Manifest.json and the conversion date
into the model's metadata. The package is normalised after saving: the date dropped, model.mlmodel
re-serialised deterministically (protobuf maps in key order), each item's UUID derived from its path
and contents, an empty weights folder (a model whose constants are all inline) dropped with its item
so the package does not depend on copies keeping empty folders; coremltools then loads the package again (a normalisation that broke it fails here).
Runs in a fresh child (kiln.runtime.child): the tracer's and MIL's generated names come from
process-wide counters. Its noise (coremltools' "Torch version ... has not been tested", progress bars)
goes to the step's log.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from kiln.base.temps import temp_path
from kiln.errors import StepError, one_line
from kiln.rules import TORCH_MODEL_MEMORY, Params, Rule, RunContext, register
from kiln.runtime.child import fail, in_fresh_stack, portable_code_paths, read_job, run_in_child

CONVERSION_DATE = "com.github.apple.coremltools.conversion_date"  # the one metadata entry that varies run to run


class CoremlParams(Params):
    """What every Core ML export takes, whatever the source's framework (export_coreml_tf too)."""

    source: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    precision: Literal["fp32", "fp16"]
    minimum_deployment_target: str
    max_sizes: dict[str, int] = {}  # every named dim of the inputs -> its upper bound


class ExportCoremlParams(CoremlParams):
    via: Literal["trace", "torch_export"] = "trace"


@register
class ExportCoreml(Rule):
    name = "export_coreml"
    version = 3  # 2: the trace checked against the source (facts: trace_checked_at); no empty weights folder. 3: outputs typed as the manifest's (fp16 for iOS16+ made them float16)
    tools = ("torch", "transformers", "coremltools")
    Params = ExportCoremlParams
    cost = 11
    memory_base_mib, memory_per_input = TORCH_MODEL_MEMORY
    runs_in_child = True  # the parent only writes the job and waits

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ExportCoremlParams, ctx: RunContext) -> dict[str, Any]:
        from kiln.sources.jobs import source_job

        import json

        out = outputs["model"]
        checked = temp_path(out, "checked")  # the child writes where it checked the trace (report facts)
        try:
            try:
                run_in_child(ctx.step, "kiln.build_rules.export_coreml:child_main", source_job(params, inputs, out, ctx.root) | {"checked": str(checked)},
                             "coremltools could not convert the model")
            except StepError:
                verdict = json.loads(checked.read_text()) if checked.exists() else {}
                if "error" in verdict:  # the trace check's own one-line error, not the child's exit
                    raise StepError(ctx.step, verdict["error"]) from None
                raise
            trace_checked_at = json.loads(checked.read_text())["checked_at"]
        finally:
            checked.unlink(missing_ok=True)
        return {"via": params.via, "minimum_deployment_target": params.minimum_deployment_target, "bytes": _folder_bytes(out), "trace_checked_at": trace_checked_at}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def child_main() -> None:
    import tempfile

    import json
    import sys

    from kiln.formats.coreml import import_coremltools
    from kiln.sources import model_and_example

    ct = import_coremltools()
    job = read_job()
    params = ExportCoremlParams(**job["params"])
    model, args = model_and_example(params.source, [Path(f) for f in job["files"]], params.inputs, params.outputs, Path(job["root"]))
    portable_code_paths(job["root"], model)
    out = Path(job["out"])
    register_missing_torch_ops()
    # coremltools keeps its working package in the temp folder: a private one beside the output,
    # so nothing large is left in /tmp and the step's temp sweep owns it
    work = temp_path(out, "coreml")
    work.mkdir()
    tempfile.tempdir = str(work)
    try:
        try:
            if params.via == "trace":
                program, warned = in_fresh_stack(_trace, model, args)
            else:
                program, warned = _export(model, args, params.inputs), []
        except Exception as err:  # the tracer and torch.export raise many types
            fail(err)
        # Core ML cannot run here (Linux): what can be checked is that the program coremltools converts
        # computes what the source does, in torch, at the example's shapes and at other sizes
        verdict = check_program(params, model, program if params.via == "trace" else program.module(), args, warned)
        Path(job["checked"]).write_text(json.dumps(verdict))
        if "error" in verdict:
            sys.exit(1)
        try:
            mlmodel = ct.convert(program, inputs=core_ml_inputs(ct, params, args), outputs=core_ml_outputs(ct, params.outputs),
                                 convert_to="mlprogram", compute_precision=ct.precision.FLOAT16 if params.precision == "fp16" else ct.precision.FLOAT32,
                                 minimum_deployment_target=getattr(ct.target, params.minimum_deployment_target))
        except Exception as err:  # coremltools raises many types
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
    """(the traced module, the tracer's warnings, one line each). TracerWarnings say the trace fixed
    a Python value (often a shape) to the example's: each is written to the step's log, and
    check_program names them when the trace is wrong at another size."""
    import sys
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, args, strict=False)
    lines = list(dict.fromkeys(f"{w.filename}:{w.lineno}: {w.category.__name__}: {one_line(w.message)}" for w in caught))
    for line in lines:
        print(line, file=sys.stderr)
    # for the error: where, and the warning's first sentence ("Converting a tensor to a Python integer ...")
    warned = list(dict.fromkeys(f"{w.filename}:{w.lineno}: {one_line(w.message).split('. ')[0]}" for w in caught if issubclass(w.category, torch.jit.TracerWarning)))
    return traced, warned


def other_sizes(params: ExportCoremlParams, args) -> dict[str, int]:
    """Each named dim at a size other than the example's, within 1..its bound (the example's + 1, or
    - 1 at the bound); a dim whose bound leaves no other size is left out."""
    example = example_sizes(params, args)
    sizes = {}
    for dim, size in example.items():
        bound = params.max_sizes.get(dim, size)
        other = size + 1 if size + 1 <= bound else size - 1
        if other >= 1 and other != size:
            sizes[dim] = other
    return sizes


def example_sizes(params: ExportCoremlParams, args) -> dict[str, int]:
    """Each named dim's size in the example inputs."""
    sizes: dict[str, int] = {}
    for tensor, example in zip(params.inputs, args, strict=True):
        for axis, dim in enumerate(tensor.get("shape") or []):
            if isinstance(dim, str):
                sizes.setdefault(dim, int(example.shape[axis]))
    return sizes


def resized(params: ExportCoremlParams, args, sizes: dict[str, int]) -> tuple:
    """The example inputs with each named dim at `sizes`' size: the example's values repeated along
    that axis (or cut), so token ids, masks and value ranges stay ones the model takes."""
    import torch

    out = []
    for tensor, example in zip(params.inputs, args, strict=True):
        for axis, dim in enumerate(tensor.get("shape") or []):
            if isinstance(dim, str) and dim in sizes:
                index = torch.arange(sizes[dim]) % example.shape[axis]
                example = example.index_select(axis, index)
        out.append(example.contiguous())
    return tuple(out)


def check_program(params: ExportCoremlParams, model, program, args, warned: list[str]) -> dict[str, Any]:
    """The traced (or exported) program gives the source's outputs on the example and on inputs whose
    named dims all have other sizes (other_sizes): a trace that fixed a shape to the example's would
    otherwise convert to a package that accepts every size in the range and is wrong at all but one,
    which nothing off macOS could notice. Returns {"checked_at": the sizes, for the report} or
    {"error": one line saying where the program differs}."""
    example = example_sizes(params, args)
    checked = {"example": example}
    other = other_sizes(params, args)
    if other:
        checked["other"] = other
    try:
        _compare(params, model, program, args, example, warned)
        if other:
            _compare(params, model, program, resized(params, args, other), other, warned)
    except ValueError as err:
        return {"error": str(err)}
    return {"checked_at": checked}


def _compare(params: ExportCoremlParams, model, program, args, sizes: dict[str, int], warned: list[str]) -> None:
    """Raises ValueError (one line) where the program's outputs are not the source's."""
    import torch

    where = ", ".join(f"{dim}={n}" for dim, n in sizes.items()) or "the example's shapes"
    hint = f"use via = {'torch_export' if params.via == 'trace' else 'trace'} or fix the model"
    if warned:
        hint += f" (the tracer warned at {warned[0][:200]}{f' and {len(warned) - 1} more' if len(warned) > 1 else ''})"
    with torch.no_grad():
        want = _as_tuple(model(*args))
        try:
            got = _as_tuple(program(*args))
        except Exception as err:  # the trace's fixed shapes meet other ones: any torch error
            raise ValueError(f"the {params.via} is specialised to the example's shapes: at {where} it fails ({type(err).__name__}: {one_line(err)[:200]}); {hint}") from None
    for spec, expected, actual in zip(params.outputs, want, got, strict=False):
        expected, actual = expected.detach().double(), actual.detach().double()
        if expected.shape != actual.shape:
            raise ValueError(f"the {params.via} is specialised to the example's shapes: at {where} output {spec['name']!r} has shape {list(actual.shape)}, the source's {list(expected.shape)}; {hint}")
        diff = (expected - actual).abs().max().item() if expected.numel() else 0.0
        scale = expected.abs().max().item() if expected.numel() else 0.0
        if not diff <= 1e-4 * (1.0 + scale):  # float noise of the same ops; also catches NaN
            raise ValueError(f"the {params.via} is specialised to the example's shapes: at {where} output {spec['name']!r} differs from the source's (max abs diff {diff:.4g}); {hint}")


def _as_tuple(result) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


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


def core_ml_outputs(ct, outputs: list[dict], names: list[str] | None = None) -> list:
    """ct.TensorType per manifest output, named (`names`: the ones the converter knows them by, else
    the manifest's) and typed as the manifest's dtype in Core ML: without a dtype, an fp16 program
    for iOS16 / macOS13 and later gets float16 outputs (coremltools' default), which the manifest's
    float32 outputs are not."""
    import numpy as np

    dtypes = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int32}
    return [ct.TensorType(name=name, dtype=dtypes[t.get("dtype", "float32")]) for t, name in zip(outputs, names or [t["name"] for t in outputs], strict=True)]


def normalise_package(package: Path) -> None:
    """Make the saved package's bytes a function of the model alone (see the module docstring)."""
    import hashlib
    import json
    import uuid

    from coremltools.proto import Model_pb2

    data = package / "Data"
    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    drop_empty_folder_items(data, manifest)
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


def drop_empty_folder_items(data: Path, manifest: dict) -> None:
    """A model whose constants are all small (stored inline) leaves the weights item an empty folder,
    which Manifest.json still lists: a copy that does not keep empty folders (a cache, an archive,
    git) is then a package Core ML refuses ("Item does not exist for identifier"). The folder and its
    item go; coremltools loads the package without them (checked after normalising)."""
    for identifier, item in list(manifest["itemInfoEntries"].items()):
        folder = data / item["path"]
        if identifier != manifest["rootModelIdentifier"] and folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
            shutil.rmtree(folder)
            del manifest["itemInfoEntries"][identifier]


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
