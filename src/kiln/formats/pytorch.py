"""format = "pytorch": the source model's state_dict written with torch.save (model.pt), floats cast
to the precision by the same kernels as the safetensors target; validated by loading it as a user
does, `torch.load(path, weights_only=True, map_location="cpu")`, strictly into the source
architecture and running it in torch.

The file is a plain state_dict, every key of the source module's (tied weights too, sharing one
storage as torch.save keeps them), for `model.load_state_dict(torch.load(f, weights_only=True))`.
For a Hugging Face source the target's folder holds that file alone: the architecture comes from the
user's own `from_config` or `from_pretrained` of the source, not from the artifact."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from kiln.errors import StepError, one_line
from kiln.formats.base import WeightsFormat, dtype_names
from kiln.runtime.runners import Artifact, Runner, require_precision, torch_runner
from kiln.schema.fields import TargetBase
from kiln.sources import load_torch_model

if TYPE_CHECKING:
    from kiln.plan.chains import Planner


class PytorchTarget(TargetBase):
    """The source model's state_dict as a torch.save file (.pt), floats cast to `precision`."""

    format: Literal["pytorch"]
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"


class Pytorch(WeightsFormat):
    format = "pytorch"
    Target = PytorchTarget

    def chain(self, planner: Planner, name: str, target: PytorchTarget) -> None:
        reference = planner.reference(name)
        weights = planner.add(name, "write_pytorch", {"source": planner.source_params, "precision": target.precision},
                              {"source": planner.resolved.source_files}, {"weights": "model.pt"})
        planner.validate(name, target, weights.outputs["weights"], weights, reference)

    def open_runner(self, artifact: Artifact) -> Runner:
        """The source architecture with the file's state_dict loaded strictly (every key, every shape),
        fp16/bf16 weights widened to the model's own dtype as a CPU user loads them."""
        import torch

        model = load_torch_model(artifact.source, artifact.source_files, artifact.input_names, artifact.outputs, artifact.root)
        expected = model.model.state_dict()
        try:
            loaded = torch.load(artifact.path, weights_only=True, map_location="cpu")
        except Exception as err:  # a damaged archive, or a pickle weights_only refuses: many exception types
            raise StepError(artifact.step, f"torch.load(weights_only=True) cannot load {artifact.path.name}: {one_line(err)[:300]}") from None
        state = state_dict_in(loaded, artifact)
        problem = misfit(state, expected)
        if problem:
            raise StepError(artifact.step, f"the state_dict in {artifact.path.name} does not fit the source architecture: {problem}")
        require_precision(dtype_names(state), dtype_names(expected), artifact)
        widened = {key: tensor.to(expected[key].dtype) if tensor.is_floating_point() else tensor for key, tensor in state.items()}
        try:
            model.model.load_state_dict(widened, strict=True)
        except RuntimeError as err:  # misfit checked keys and shapes; anything else load_state_dict refuses
            raise StepError(artifact.step, f"the state_dict in {artifact.path.name} does not fit the source architecture: {one_line(err)[:400]}") from None
        return torch_runner(model, artifact.input_names, artifact.outputs)


def state_dict_in(loaded: Any, artifact: Artifact) -> Mapping:
    """What torch.load gave, if it is a state_dict: a mapping of names to tensors."""
    import torch

    if not isinstance(loaded, Mapping):
        raise StepError(artifact.step, f"{artifact.path.name} holds a {type(loaded).__name__}, not a state_dict (a dict of tensors)")
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise StepError(artifact.step, f"{artifact.path.name} is not a state_dict: its entry {key!r} is a {type(value).__name__}, not a tensor")
    return loaded


def misfit(state: Mapping, expected: Mapping) -> str | None:
    """Why a state_dict does not fit the architecture whose own state_dict is `expected`, naming the
    keys; None when every key is there with its shape and kind (float or not). Checked before
    load_state_dict, whose error lists every problem over many lines."""
    missing = sorted(set(expected) - set(state))
    if missing:
        return f"missing {missing[:5]} ({len(missing)} keys)"
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        return f"unexpected {unexpected[:5]} ({len(unexpected)} keys)"
    for key, tensor in state.items():
        want = expected[key]
        if tensor.shape != want.shape:
            return f"{key!r} has shape {list(tensor.shape)}; the source architecture's is {list(want.shape)}"
        if tensor.is_floating_point() != want.is_floating_point():  # load_state_dict would convert it silently
            return f"{key!r} is {tensor.dtype}; the source architecture's is {want.dtype}"
    return None
