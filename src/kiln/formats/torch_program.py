"""format = "torchscript" and format = "torch_export": the source model as a self-contained torch
program (.pt by torch.jit.trace / script, .pt2 by torch.export), one export step from the source,
validated by loading it back as a user does and calling it with the manifest's inputs in order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from kiln.errors import StepError, one_line
from kiln.formats.base import TargetFormat
from kiln.runtime.runners import Artifact, Runner, torch_runner
from kiln.schema.fields import TargetBase

if TYPE_CHECKING:
    from kiln.plan.chains import Planner


class TorchscriptTarget(TargetBase):
    """The source model as TorchScript (.pt), reloaded with torch.jit.load for validation."""

    format: Literal["torchscript"]
    precision: Literal["fp32"] = "fp32"
    mode: Literal["trace", "script"] = Field("trace", description="trace: record one run (any model); script: compile the Python (input-dependent control flow)")


class TorchExportTarget(TargetBase):
    """The source model as a torch.export ExportedProgram (.pt2), reloaded with torch.export.load."""

    format: Literal["torch_export"]
    precision: Literal["fp32"] = "fp32"


class TorchProgram(TargetFormat):
    """What the two torch program formats share: one export step, validated by reloading it."""

    source_frameworks = frozenset({"torch"})
    validation_tools = ("torch",)
    rule: ClassVar[str]
    file: ClassVar[str]

    def export_params(self, target: Any) -> dict[str, Any]:
        return {}

    def chain(self, planner: Planner, name: str, target: Any) -> None:
        reference = planner.reference(name)
        params = {"source": planner.source_params, "inputs": planner.inputs, "outputs": planner.outputs} | self.export_params(target)
        program = planner.add(name, self.rule, params, {"source": planner.resolved.source_files}, {"model": self.file})
        planner.validate(name, target, program.outputs["model"], program, reference)

    def validation(self, planner: Planner, name: str, target: Any) -> tuple[dict, dict]:
        """A torch program takes the inputs positionally, in the manifest's order."""
        return {"inputs": planner.inputs}, {}

    def open_runner(self, artifact: Artifact) -> Runner:
        """Loaded as a user loads it: inputs passed positionally in the manifest's order, outputs
        matched to the manifest's by position (or name, for a dict)."""
        try:
            module = self.load(str(artifact.path))
        except Exception as err:  # torch raises RuntimeError and friends for a bad archive
            raise StepError(artifact.step, f"torch cannot load {artifact.path.name}: {one_line(err)[:300]}") from None
        return torch_runner(module, artifact.input_names, artifact.outputs)

    def load(self, path: str):
        raise NotImplementedError


class Torchscript(TorchProgram):
    format = "torchscript"
    Target = TorchscriptTarget
    rule, file = "export_torchscript", "model.pt"

    def export_params(self, target: TorchscriptTarget) -> dict[str, Any]:
        return {"mode": target.mode}

    def load(self, path: str):
        import torch

        return torch.jit.load(path)


class TorchExport(TorchProgram):
    format = "torch_export"
    Target = TorchExportTarget
    rule, file = "export_torch_export", "model.pt2"

    def load(self, path: str):
        import torch

        return torch.export.load(path).module()
