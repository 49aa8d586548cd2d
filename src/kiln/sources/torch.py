"""kind = "torch": a Python factory `module:function` returning a torch.nn.Module, with optional
weights (.safetensors, or a pickle with allow_pickle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from kiln.errors import StepError
from kiln.schema.fields import FACTORY, Strict
from kiln.sources.base import Resolver, call_factory, check_pickle
from kiln.sources.torch_model import TorchKind


class TorchSource(Strict):
    """A Python factory `module:function` returning a torch.nn.Module, with optional weights."""

    kind: Literal["torch"]
    factory: str = Field(pattern=FACTORY, description="module:function")
    weights: str | None = Field(None, description=".safetensors file (or .pt/.bin with allow_pickle)")
    allow_pickle: bool = False


class Torch(TorchKind):
    kind = "torch"
    Source = TorchSource

    def files(self, source: TorchSource, resolver: Resolver) -> tuple[Path, ...]:
        """The factory's module file, then the weights file."""
        files = [resolver.factory_file(source.factory)]
        if source.weights:
            weights = resolver.file(source.weights, "source.weights")
            check_pickle(weights, source.allow_pickle, resolver, "source.weights")
            files.append(weights)
        return tuple(files)

    def load_module(self, source: dict[str, Any], files: list[Path], root: Path):
        import torch

        model = call_factory(source["factory"], files[0], root)
        if not isinstance(model, torch.nn.Module):
            raise StepError("source", f"{source['factory']} returned {type(model).__name__}, not a torch.nn.Module")
        if source.get("weights"):
            weights = files[1]
            if weights.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(weights)
            else:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        return model
