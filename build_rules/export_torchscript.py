"""export_torchscript: a PyTorch source -> TorchScript (.pt), by torch.jit.trace (default) or
torch.jit.script (mode = "script", for models whose control flow depends on their inputs; run in a
child process with a fixed hash seed, see _script_in_child).

Traced with the same example inputs as the ONNX export (a Hugging Face source: tokenized text with
padding). The module's forward takes the manifest's inputs in order and returns its outputs as a
tuple in order. Saved through an in-memory buffer: torch.jit.save names the archive's root folder
after the file, and kiln writes to a temporary name first, so saving to the path directly would
put that name in the bytes. Byte-identical across runs and processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from kiln.errors import StepError, one_line
from kiln.rules import Params, Rule, RunContext, register


class ExportTorchscriptParams(Params):
    source: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    mode: Literal["trace", "script"] = "trace"


@register
class ExportTorchscript(Rule):
    name = "export_torchscript"
    version = 1
    tools = ("torch", "transformers")
    Params = ExportTorchscriptParams

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ExportTorchscriptParams, ctx: RunContext) -> dict[str, Any]:
        import io
        import warnings

        import torch

        from kiln.data import export_example
        from kiln.sources import load_torch_model

        if params.mode == "script":
            return _script_in_child(inputs, outputs, params, ctx)
        torch.manual_seed(0)
        input_names = [t["name"] for t in params.inputs]
        model = load_torch_model(params.source, inputs["source"], input_names, [t["name"] for t in params.outputs], ctx.root)
        example = export_example(params.inputs, params.source, inputs["source"])
        args = tuple(torch.from_numpy(example[name]) for name in input_names)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
                module = torch.jit.trace(model, args, strict=False)
        except Exception as err:  # torch.jit raises many types (frontend errors, RuntimeError...)
            raise StepError(ctx.step, f"torch.jit.trace failed: {one_line(err)[:400]}") from None
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
        outputs["model"].write_bytes(buffer.getvalue())
        return {"mode": params.mode, "bytes": len(buffer.getvalue())}


def _script_in_child(inputs, outputs, params: ExportTorchscriptParams, ctx: RunContext) -> dict[str, Any]:
    """torch.jit.script writes a module's constants in the order of a Python set of their names, which
    string-hash randomization reshuffles per process; a child with PYTHONHASHSEED=0 scripts the same
    bytes every time."""
    import json
    import os
    import subprocess
    import sys

    job = {"source": params.source, "files": [str(p) for p in inputs["source"]], "inputs": [t["name"] for t in params.inputs],
           "outputs": [t["name"] for t in params.outputs], "root": str(ctx.root), "out": str(outputs["model"])}
    proc = subprocess.run([sys.executable, "-c", "from kiln.build_rules.export_torchscript import script_main; script_main()"],
                          input=json.dumps(job), capture_output=True, text=True, env=os.environ | {"PYTHONHASHSEED": "0"})
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise StepError(ctx.step, f"torch.jit.script failed: {last[:400]}; mode = \"trace\" records one run instead")
    return {"mode": "script", "bytes": outputs["model"].stat().st_size}


def script_main() -> None:
    """Child of _script_in_child: script the source module itself (kiln's calling wrapper takes *args,
    which TorchScript cannot compile) and save it; a failure exits 1 with one line on stderr."""
    import io
    import json
    import sys
    from pathlib import Path

    import torch

    from kiln.sources import load_torch_model

    job = json.loads(sys.stdin.read())
    torch.manual_seed(0)
    named = load_torch_model(job["source"], [Path(f) for f in job["files"]], job["inputs"], job["outputs"], Path(job["root"]))
    try:
        module = torch.jit.script(named.model)
    except Exception as err:  # torch.jit frontend errors come in many types
        sys.exit(f"{type(err).__name__}: {one_line(err)}")
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    Path(job["out"]).write_bytes(buffer.getvalue())
