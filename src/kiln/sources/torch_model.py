"""Sources that are a torch.nn.Module (a Hugging Face folder, a factory): loading the module with
kiln's calling convention, its export example, its ONNX export step and its reference run."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from kiln.runtime.runners import pick_outputs
from kiln.sources.base import SourceKind

if TYPE_CHECKING:
    from kiln.plan.chains import Planner
    from kiln.plan.steps import Step
    from kiln.rules import RunContext


class TorchKind(SourceKind):
    framework: ClassVar[str | None] = "torch"
    keyword_inputs: ClassVar[bool] = False  # forward(**inputs by name) rather than forward(*inputs in order)

    @abstractmethod
    def load_module(self, source: dict[str, Any], files: list[Path], root: Path):
        """The source's own nn.Module (not yet in eval mode)."""

    def example(self, inputs: list[dict], files: list[Path]) -> dict:
        """The example inputs exporters trace with: seeded values (kiln.runtime.data.example_inputs)."""
        from kiln.runtime.data import example_inputs  # numpy: kept off the planning path

        return example_inputs(inputs)

    def load_torch_model(self, source: dict[str, Any], files: list[Path], input_names: list[str], output_names: list[str], root: Path):
        """The source as an nn.Module in eval mode whose forward takes the manifest's inputs in order and
        returns a tuple of the manifest's outputs in order."""
        import torch

        inner = self.load_module(source, files, root)
        inner.eval()
        by_name = self.keyword_inputs

        class Named(torch.nn.Module):
            """Positional inputs in, a tuple of named outputs out: one calling convention for every rule."""

            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, *args):
                if by_name:
                    result = self.model(**dict(zip(input_names, args)))
                else:
                    result = self.model(*args)
                return pick_outputs(result, output_names)

        return Named(inner).eval()

    def model_and_example(self, source: dict[str, Any], files: list[Path], inputs: list[dict], outputs: list[dict], root: Path):
        """(model, example args) for an exporter: the seeded source in eval mode (see load_torch_model)
        and its example inputs as tensors in the manifest's order."""
        import torch

        torch.manual_seed(0)
        names = [t["name"] for t in inputs]
        model = self.load_torch_model(source, files, names, [t["name"] for t in outputs], root)
        example = self.example(inputs, files)
        return model, tuple(torch.from_numpy(example[name]) for name in names)

    def onnx_step(self, planner: Planner, name: str, target: Any) -> tuple[Path, Step | None]:
        external, outputs = planner.onnx_outputs(target)
        step = planner.add(name, "export_onnx", {
            "source": planner.source_params, "inputs": planner.inputs, "outputs": planner.outputs,
            "opset": target.opset, "constant_folding": target.options.constant_folding,
        } | external, {"source": planner.resolved.source_files}, outputs)
        return step.outputs["model"], step

    def run_reference(self, feeds: Iterator[dict], files: list[Path], source: dict, inputs: list[dict],
                      outputs: list[dict], ctx: RunContext) -> Iterator[tuple[dict, dict]]:
        import numpy as np
        import torch

        output_names = [t["name"] for t in outputs]
        model = self.load_torch_model(source, files, [t["name"] for t in inputs], output_names, ctx.root)
        with torch.inference_mode():
            for feed in feeds:
                result = model(*(torch.from_numpy(feed[t["name"]]) for t in inputs))
                yield feed, {name: np.ascontiguousarray(value.numpy()) for name, value in zip(output_names, result)}
