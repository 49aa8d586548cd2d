"""export_torchscript: a PyTorch source -> TorchScript (.pt), by torch.jit.trace (default) or
torch.jit.script (mode = "script", for models whose control flow depends on their inputs).

Traced with the same example inputs as the ONNX export (a Hugging Face source: tokenized text with
padding). A traced module's forward takes the manifest's inputs in order and returns its outputs as
a tuple in order; a scripted one is the source module itself. Runs in a fresh child (kiln.runtime.child):
TorchScript's type names and constant order depend on the process's history. Saved through a buffer,
since torch.jit.save names the archive's root folder after the (temporary) file. Byte-identical
across runs, processes and workspaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from kiln.rules import TORCH_MODEL_MEMORY, Params, Rule, RunContext, register
from kiln.runtime.child import fail, in_fresh_stack, run_in_child


class ExportTorchscriptParams(Params):
    source: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    mode: Literal["trace", "script"] = "trace"


@register
class ExportTorchscript(Rule):
    name = "export_torchscript"
    version = 3  # 2: traced files name machine-independent source paths; 3: kiln's own frames too
    tools = ("torch", "transformers", "python")  # python: traced files record threading.py's frames (kiln.base.tools.PYTHON)
    Params = ExportTorchscriptParams
    memory_base_mib, memory_per_input = TORCH_MODEL_MEMORY

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ExportTorchscriptParams, ctx: RunContext) -> dict[str, Any]:
        from kiln.sources.jobs import source_job

        job = source_job(params, inputs, outputs["model"], ctx.root)
        hint = "; mode = \"trace\" records one run instead" if params.mode == "script" else ""
        run_in_child(ctx.step, "kiln.build_rules.export_torchscript:child_main", job, f"torch.jit.{params.mode} failed", hint)
        return {"mode": params.mode, "bytes": outputs["model"].stat().st_size}


def child_main() -> None:
    import io

    import torch

    from kiln.sources.jobs import read_source_job

    # scripting reads the source back through the code's file names: only traced programs get portable ones
    params, model, args, out = read_source_job(ExportTorchscriptParams, portable_paths=lambda p: p.mode == "trace")
    try:
        if params.mode == "trace":  # on a fresh stack: every frame the tracer records has a portable file name
            module = in_fresh_stack(_trace, model, args)
        else:  # script the source module itself: kiln's calling wrapper takes *args, which TorchScript cannot
            module = torch.jit.script(model.model)
    except Exception as err:  # torch.jit raises many types (frontend errors, RuntimeError...)
        fail(err)
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    out.write_bytes(buffer.getvalue())


def _trace(model, args):
    import warnings

    import torch

    with warnings.catch_warnings(), torch.no_grad():  # grad mode is per thread: set here, on the tracing thread
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        return torch.jit.trace(model, args, strict=False)


# Set here, below _trace and not in the class: traced TorchScript records the line numbers of the
# frames it traces under, _trace's included, so a line added above it changes every artifact's bytes.
ExportTorchscript.runs_in_child = True  # the parent only writes the job and waits
ExportTorchscript.cost = 6  # seconds of a first run (Rule.cost)
