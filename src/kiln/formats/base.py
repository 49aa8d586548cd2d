"""What a target format is: the verbs every module of kiln.formats gives.

A format says
- definition: its target table (`Target`, a pydantic model with `format = "<name>"`), the optional
  extra its converter needs, whether it needs a torch source, and its cross-checks (`check`);
- planning: the chain of steps that makes and publishes its artifact (`chain`), and what its
  validate step needs besides the artifact (`validation`);
- running: how its artifact is opened for validation (`open_runner`) in the runtime it deploys with,
  which tools key that validation (`validation_tools`), what hardware it needs (`unavailable_reason`)
  and, where it means something, its latency (`latency`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kiln.runtime.runners import Artifact, Runner
from kiln.schema.fields import TargetBase

if TYPE_CHECKING:
    from kiln.plan.chains import Planner


class TargetFormat(ABC):
    format: ClassVar[str]
    Target: ClassVar[type[TargetBase]]
    extra: ClassVar[tuple[str, str] | None] = None  # (python module its converter imports, pip extra)
    # made from the source model in one of these frameworks ("torch", "tensorflow"), not from the fp32
    # ONNX every source gives; None: from any source (kiln.define.spec refuses the others by name)
    source_frameworks: ClassVar[frozenset[str] | None] = None
    validation_tools: ClassVar[tuple[str, ...]]  # the runtime validate runs it in: its versions key that step

    def check(self, spec: Any, name: str, target: Any) -> None:
        """Raise CrossError for what this target's keys demand of each other and of the manifest."""

    @abstractmethod
    def chain(self, planner: Planner, name: str, target: Any) -> None:
        """Add the steps that make, validate and publish this target's artifact."""

    def validation(self, planner: Planner, name: str, target: Any) -> tuple[dict[str, Any], dict[str, tuple[Path, ...]]]:
        """Params and inputs the validate step needs besides the artifact and the reference outputs.
        They enter only when a format needs them, so a source change reaches other formats only
        through their model input."""
        return {}, {}

    def unavailable_reason(self, target: Any) -> str | None:
        """Why this machine cannot build the target (hardware it lacks), or None."""
        return None

    @abstractmethod
    def open_runner(self, artifact: Artifact) -> Runner:
        """A function batch -> outputs running the artifact as its users do. Raises
        RuntimeUnavailable when the runtime does not exist here, StepError for a bad artifact."""

    def validation_hardware(self) -> dict[str, Any] | None:
        """What about this machine decides whether the artifact can run here at all (Core ML: a
        macOS runtime), for the validate step's key; None (most formats): nothing, the key is as before."""
        return None

    def latency(self, artifact: Path, feed: dict) -> dict[str, Any] | None:
        """Latency of the artifact on one sample, for the report; None where kiln does not measure it."""
        return None


class WeightsFormat(TargetFormat):
    """A format that holds only the source model's weights (safetensors, pytorch): validated by
    loading them into the source architecture in torch, which its validate step therefore needs."""

    source_frameworks = frozenset({"torch"})
    validation_tools = ("torch", "transformers")

    def validation(self, planner: Planner, name: str, target: Any) -> tuple[dict, dict]:
        """Weights only: the source architecture is part of the check."""
        return {"source": planner.source_params, "inputs": planner.inputs}, {"source": planner.resolved.source_files}


def dtype_names(state: dict) -> dict[str, str]:
    """A torch state_dict's dtypes by key, as numpy names them (float32, float16, bfloat16, int64...)."""
    return {key: str(tensor.dtype).removeprefix("torch.") for key, tensor in state.items()}
