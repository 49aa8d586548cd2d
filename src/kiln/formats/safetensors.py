"""format = "safetensors": the source model's weights (its state_dict) as SafeTensors, written by
kiln's streaming writer, floats cast by kiln's kernels; validated by loading them strictly into the
source architecture and running it in torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from kiln.errors import StepError, one_line
from kiln.formats.base import TargetFormat
from kiln.runtime.runners import Artifact, Runner, torch_runner
from kiln.schema.fields import TargetBase
from kiln.sources import load_torch_model

if TYPE_CHECKING:
    from kiln.plan.chains import Planner


class SafetensorsTarget(TargetBase):
    """The source model's weights (its state_dict) as SafeTensors, floats cast to `precision`."""

    format: Literal["safetensors"]
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"


class Safetensors(TargetFormat):
    format = "safetensors"
    Target = SafetensorsTarget
    needs_torch_source = True
    validation_tools = ("torch", "transformers")

    def chain(self, planner: Planner, name: str, target: SafetensorsTarget) -> None:
        reference = planner.reference(name)
        weights = planner.add(name, "write_safetensors", {"source": planner.source_params, "precision": target.precision},
                              {"source": planner.resolved.source_files}, {"weights": "model.safetensors"})
        planner.validate(name, target, weights.outputs["weights"], weights, reference)

    def validation(self, planner: Planner, name: str, target: Any) -> tuple[dict, dict]:
        """Weights only: the source architecture is part of the check."""
        return {"source": planner.source_params, "inputs": planner.inputs}, {"source": planner.resolved.source_files}

    def open_runner(self, artifact: Artifact) -> Runner:
        """The source architecture with the artifact's weights loaded (strictly: every key, every shape).
        Weights stored at fp16/bf16 are widened to the model's own dtype, as a CPU user loads them."""
        import numpy as np
        import torch

        from kiln.native import safetensors

        model = load_torch_model(artifact.source, artifact.source_files, artifact.input_names, artifact.outputs, artifact.root)
        expected = model.model.state_dict()
        state = {}
        for key, array in safetensors.load_file(artifact.path).items():
            target = expected.get(key)
            tensor = torch.from_numpy(np.asarray(array, dtype=np.float32) if array.dtype.kind == "f" or "bfloat16" in str(array.dtype) else array)
            state[key] = tensor.to(target.dtype) if target is not None else tensor
        try:
            model.model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise StepError(artifact.step, f"weights of {artifact.path.name} do not fit the source architecture: {one_line(err)[:400]}") from None
        return torch_runner(model, artifact.input_names, artifact.outputs)
