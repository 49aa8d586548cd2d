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


# options.external_data = "auto" turns external data on when the source's files exceed this. Below
# protobuf's 2 GiB limit with room to spare: the fp32 export also holds the graph and the constants
# the exporter folds, so a source just under 2 GiB can give an ONNX just over it.
EXTERNAL_DATA_AUTO_BYTES = 3 << 29  # 1.5 GiB
EXTERNAL_DATA_FILE = "model.onnx.data"  # the one data file beside model.onnx; its name is recorded in the proto


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
        # `columns` only where set: inputs without it keep the params (and step keys) they had before it existed
        self.inputs = [t.model_dump(exclude=None if t.columns else {"columns"}) for t in spec.inputs]
        self.outputs = [t.model_dump(exclude={"columns"}) for t in spec.outputs]

    def reference(self, name: str) -> Step:
        """The source model's outputs on the validation data (one step per model and data)."""
        validation = self.spec.validation
        params = {
            "source": self.source_params, "inputs": self.inputs, "outputs": self.outputs,
            "batch_size": validation.batch_size, "max_length": self.max_length(validation), "max_samples": validation.max_samples,
        }
        if self.resolved.data_file.suffix == ".txt":
            params["by_length_after"] = self.file_order_samples()
        inputs = {"source": self.resolved.source_files, "data": (self.resolved.data_file,)}
        return self.add(name, "reference_outputs", params, inputs, {"outputs": "reference.safetensors"})

    def file_order_samples(self) -> int:
        """How many validation samples keep the file's order before the rest are batched by length:
        the first batch (mixed lengths: padding gets exercised) and every sample a sensitivity scan
        reads (options.scan_samples: the scan measures the first N in file order, as it always has)."""
        scans = [getattr(t.options, "scan_samples", 0) for t in self.spec.targets.values()
                 if getattr(getattr(t, "options", None), "fallback", None) == "auto"]
        return max([self.spec.validation.batch_size, *scans])

    def fp32_onnx(self, name: str, target) -> tuple[Path, Step | None]:
        """The fp32 ONNX a target starts from: what the source gives (an export, a conversion, or the
        source file itself), then onnxsim where the target asks and the source allows; shared by
        every target that asks for the same opset and options."""
        model, model_step = self.source.onnx_step(self, name, target)
        # onnxsim is not run on external-data models (docs/design.md); export_onnx's facts say so
        if self.source.simplify_onnx and target.options.simplify and not self.external_data(target):
            model_step = self.add(name, "simplify_onnx", {}, {"model": self.onnx_files(model, model_step)}, {"model": "model.onnx"}, [model_step])
            model = model_step.outputs["model"]
        return model, model_step

    def external_data(self, target) -> bool:
        """Whether every ONNX of this target's chain is written with its tensors in model.onnx.data.
        Decided here, at plan time, because a step's output files are fixed roles known before it runs."""
        wanted = target.options.external_data
        return self.resolved.source_bytes > EXTERNAL_DATA_AUTO_BYTES if wanted == "auto" else wanted

    def onnx_outputs(self, target) -> tuple[dict, dict]:
        """(params to add, output roles) of a step writing an ONNX model in this target's chain. The
        param is there only when external data is on, so every other step keeps its id."""
        if self.external_data(target):
            return {"external_data": True}, {"model": "model.onnx", "data": EXTERNAL_DATA_FILE}
        return {}, {"model": "model.onnx"}

    def onnx_files(self, model: Path, model_step: Step | None) -> tuple[Path, ...]:
        """An ONNX model and the external data files it reads: the step input that carries them all,
        so a changed data file changes every key downstream. A source ONNX file comes with the data
        files its source kind resolved beside it."""
        if model_step is not None:
            return (model, model_step.outputs["data"]) if "data" in model_step.outputs and model_step.outputs["model"] == model else (model,)
        files = self.resolved.source_files
        return files if files and files[0] == model else (model,)

    def onnx_step(self, name: str, target, rule: str, params: dict, model: Path, model_step: Step | None,
                  inputs: dict | None = None, deps: list[Step | None] | None = None) -> Step:
        """A step turning the ONNX model (with its data files) into another ONNX model of this target's chain."""
        more_params, outputs = self.onnx_outputs(target)
        inputs = {"model": self.onnx_files(model, model_step)} | (inputs or {})
        return self.add(name, rule, params | more_params, inputs, outputs, [model_step] if deps is None else deps)

    def onnx_companions(self, model: Path, model_step: Step | None) -> dict[str, Path]:
        """The external data files published beside an ONNX artifact, by role: data, data_2, ..."""
        return {("data" if i == 0 else f"data_{i + 1}"): p for i, p in enumerate(self.onnx_files(model, model_step)[1:])}

    def max_length(self, table) -> int:
        """How many tokens text data is cut to: the table's max_length, and no more than the model has
        positions for (a max_length set above that is refused by resolve; the default of 128 is cut
        to fit a model with fewer)."""
        positions = self.resolved.text_positions
        return min(table.max_length, positions) if positions else table.max_length

    def tokenizer(self, data: Path) -> dict[str, tuple[Path, ...]]:
        """Text data is tokenized with the source's tokenizer, whose files are then inputs too."""
        return {"source": self.resolved.source_files} if data.suffix == ".txt" else {}

    def budget(self, name: str) -> dict:
        """What options.fallback = "auto" aims at: this target's gates (its effective thresholds, as
        its validate step gets them) on the validated outputs, with the metric settings they need."""
        validation = self.spec.validation
        budget = {"goal": {k: v for k, v in effective_thresholds(self.spec, name).model_dump().items() if v is not None},
                  "outputs": validation.outputs or [o.name for o in self.spec.outputs], "metrics": list(validation.metrics)}
        return budget | ({"padding_mask": validation.padding_mask} if validation.padding_mask else {})

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
