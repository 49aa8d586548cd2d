"""export_torch_export: a PyTorch source -> torch.export ExportedProgram (.pt2), with the
manifest's named dimensions dynamic (torch.export.Dim.DYNAMIC: export infers their ranges and any
equalities from the model) and torch.export.save's format.

Exported with the same example inputs as the ONNX export; saved through an in-memory buffer so the
bytes do not depend on the (temporary) file name. Byte-identical across runs and processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import StepError, one_line
from kiln.rules import Params, Rule, RunContext, register


class ExportTorchExportParams(Params):
    source: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


@register
class ExportTorchExport(Rule):
    name = "export_torch_export"
    version = 1
    tools = ("torch", "transformers")
    Params = ExportTorchExportParams

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ExportTorchExportParams, ctx: RunContext) -> dict[str, Any]:
        import io

        import torch

        from kiln.data import export_example
        from kiln.sources import load_torch_model

        torch.manual_seed(0)
        input_names = [t["name"] for t in params.inputs]
        model = load_torch_model(params.source, inputs["source"], input_names, [t["name"] for t in params.outputs], ctx.root)
        example = export_example(params.inputs, params.source, inputs["source"])
        args = tuple(torch.from_numpy(example[name]) for name in input_names)
        dynamic = tuple({axis: torch.export.Dim.DYNAMIC for axis, dim in enumerate(t.get("shape") or []) if isinstance(dim, str)} or None
                        for t in params.inputs)
        try:
            program = torch.export.export(model, args, dynamic_shapes=(dynamic,), strict=False)  # forward(*args): one tuple
        except Exception as err:  # torch.export raises UserError, GuardOnDataDependentSymNode, ...
            raise StepError(ctx.step, f"torch.export failed: {one_line(err)[:400]}") from None
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        outputs["model"].write_bytes(buffer.getvalue())
        return {"nodes": len(program.graph.nodes), "bytes": len(buffer.getvalue())}
