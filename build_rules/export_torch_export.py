"""export_torch_export: a PyTorch source -> torch.export ExportedProgram (.pt2), with the
manifest's named dimensions dynamic (torch.export.Dim.DYNAMIC: export infers their ranges and any
equalities from the model) and torch.export.save's format.

Exported with the same example inputs as the ONNX export, in a fresh child (kiln.runtime.child: what torch
writes depends on the process's history), saved through a buffer so the bytes do not depend on the
(temporary) file name. Byte-identical across runs, processes and workspaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.rules import TORCH_MODEL_MEMORY, Params, Rule, RunContext, register
from kiln.runtime.child import fail, run_in_child


class ExportTorchExportParams(Params):
    source: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


@register
class ExportTorchExport(Rule):
    name = "export_torch_export"
    version = 2  # 2: stack traces name machine-independent source paths
    tools = ("torch", "transformers")
    Params = ExportTorchExportParams
    cost = 9
    memory_base_mib, memory_per_input = TORCH_MODEL_MEMORY
    runs_in_child = True  # the parent only writes the job and waits

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ExportTorchExportParams, ctx: RunContext) -> dict[str, Any]:
        from kiln.sources.jobs import source_job

        run_in_child(ctx.step, "kiln.build_rules.export_torch_export:child_main", source_job(params, inputs, outputs["model"], ctx.root), "torch.export failed")
        return {"bytes": outputs["model"].stat().st_size}


def child_main() -> None:
    import io

    import torch

    from kiln.sources.jobs import read_source_job

    params, model, args, out = read_source_job(ExportTorchExportParams)
    dynamic = tuple({axis: torch.export.Dim.DYNAMIC for axis, dim in enumerate(t.get("shape") or []) if isinstance(dim, str)} or None
                    for t in params.inputs)
    try:
        program = torch.export.export(model, args, dynamic_shapes=(dynamic,), strict=False)  # forward(*args): one tuple
    except Exception as err:  # torch.export raises UserError, GuardOnDataDependentSymNode, ...
        fail(err)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    out.write_bytes(buffer.getvalue())
