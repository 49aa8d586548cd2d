"""Spec -> steps. Pure: reads no file, imports no doit, runs no rule.

Each target expands into the chain of steps its format gives (kiln.formats.<format>.chain), built
with the Planner's verbs: the reference outputs every target is validated against, the fp32 ONNX
its source gives (kiln.sources.<kind>.onnx_step, then onnxsim), any step by rule, params, inputs
and outputs, and the publishing validate step. A step asked for twice (same rule, params and input
paths) is one step, listing every target that needs it.
"""

from __future__ import annotations

from pathlib import Path

from kiln.define.resolve import Resolved
from kiln.define.spec import Spec, effective_thresholds
from kiln.formats import target_format
from kiln.plan.steps import PUBLISH_RULE, Plan, Step, identity
from kiln.sources import source_kind


def plan(spec: Spec, resolved: Resolved, manifest: Path, root: Path) -> Plan:
    planner = Planner(spec, resolved, root)
    for target_name in spec.targets:
        target = spec.targets[target_name]
        target_format(target.format).chain(planner, target_name, target)
    return Plan(spec.model.name, manifest, root, planner.steps, resolved=resolved)


class Planner:
    """What a format's chain builds with. Steps come out in the order they are first asked for,
    which is a dependency order (a step's inputs are asked for before it)."""

    def __init__(self, spec: Spec, resolved: Resolved, root: Path):
        self.spec = spec
        self.resolved = resolved
        self.root = root
        self.build_dir = root / "build" / spec.model.name
        self.steps: list[Step] = []
        self._by_id: dict[str, Step] = {}
        self.source = source_kind(spec.source.kind)
        self.source_params = spec.source.model_dump()
        self.inputs = [t.model_dump() for t in spec.inputs]
        self.outputs = [t.model_dump() for t in spec.outputs]

    def reference(self, name: str) -> Step:
        """The source model's outputs on the validation data (one step per model and data)."""
        validation = self.spec.validation
        params = {
            "source": self.source_params, "inputs": self.inputs, "outputs": self.outputs,
            "batch_size": validation.batch_size, "max_length": validation.max_length, "max_samples": validation.max_samples,
        }
        inputs = {"source": self.resolved.source_files, "data": (self.resolved.data_file,)}
        return self.add(name, "reference_outputs", params, inputs, {"outputs": "reference.safetensors"})

    def fp32_onnx(self, name: str, target) -> tuple[Path, Step | None]:
        """The fp32 ONNX a target starts from: what the source gives (an export, a conversion, or the
        source file itself), then onnxsim where the target asks and the source allows; shared by
        every target that asks for the same opset and options."""
        model, model_step = self.source.onnx_step(self, name, target)
        if self.source.simplify_onnx and target.options.simplify:
            model_step = self.add(name, "simplify_onnx", {}, {"model": (model,)}, {"model": "model.onnx"}, [model_step])
            model = model_step.outputs["model"]
        return model, model_step

    def tokenizer(self, data: Path) -> dict[str, tuple[Path, ...]]:
        """Text data is tokenized with the source's tokenizer, whose files are then inputs too."""
        return {"source": self.resolved.source_files} if data.suffix == ".txt" else {}

    def validate(self, name: str, target, model: Path, model_step: Step | None, reference: Step, companions: dict[str, Path] | None = None) -> None:
        """The publishing step. companions: files published beside the artifact (OpenVINO's weights,
        TensorRT's timing cache), by role; they follow the model in the step's model input, in that order."""
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
        companions = companions or {}
        inputs = {"model": (model, *companions.values()), "reference": (reference.outputs["outputs"],)}
        more_params, more_inputs = target_format(target.format).validation(self, name, target)
        params |= more_params
        inputs |= more_inputs
        published = {"artifact": self.build_dir / name / f"model{model.suffix}", "validation": self.build_dir / name / "validation.json"}
        published |= {role: self.build_dir / name / path.name for role, path in companions.items()}
        deps = [s for s in (model_step, reference) if s is not None]
        self.add(name, PUBLISH_RULE, params, inputs, published, deps)

    def add(self, target: str, rule: str, params: dict, inputs: dict, outputs: dict, deps: list[Step | None] = ()) -> Step:
        """A step of `rule` for `target` (the existing one when the same was asked for before).
        outputs: role -> a file name in the step's folder build/.steps/<id>/, or a Path to publish to."""
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
