"""export_onnx: a PyTorch source (Hugging Face folder or factory) -> ONNX, via torch.onnx.export.

Uses the TorchScript-based exporter (dynamo=False): on BERT it is ~6x faster than dynamo export
and onnxsim shrinks its graph instead of growing it. Dynamic axes come from the manifest's named
dimensions. Deterministic: seeded example inputs, eval mode, no timestamps in ONNX.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import StepError, one_line
from kiln.rules import TORCH_MODEL_MEMORY, Params, Rule, RunContext, register


class ExportOnnxParams(Params):
    source: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    opset: int
    constant_folding: bool = True
    external_data: bool = False  # write model.onnx + the "data" output (all tensors), see kiln.runtime.onnx_graph.save_external


@register
class ExportOnnx(Rule):
    name = "export_onnx"
    version = 1
    tools = ("torch", "transformers", "onnx")
    Params = ExportOnnxParams
    cost = 5  # the first torch import of the build, then the export
    memory_base_mib, memory_per_input = TORCH_MODEL_MEMORY

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ExportOnnxParams, ctx: RunContext) -> dict[str, Any]:
        import tempfile
        import warnings

        import torch

        from kiln.sources import model_and_example

        input_names = [t["name"] for t in params.inputs]
        output_names = [t["name"] for t in params.outputs]
        model, args = model_and_example(params.source, inputs["source"], params.inputs, params.outputs, ctx.root)
        dynamic_axes = {t["name"]: _axes(t) for t in params.inputs + params.outputs if _axes(t)}
        # Exported into a private folder: over 2 GB the exporter writes one external file per tensor
        # beside the model, which must not land in the step's folder.
        with tempfile.TemporaryDirectory(dir=outputs["model"].parent, prefix=".kiln-export-") as tmp:
            exported = Path(tmp) / "model.onnx"
            try:  # only the exporter: a failure loading the model or its example names its own cause
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
                    torch.onnx.export(
                        model, args, str(exported), input_names=input_names, output_names=output_names,
                        dynamic_axes=dynamic_axes, opset_version=params.opset,
                        do_constant_folding=params.constant_folding, dynamo=False,
                    )
            except Exception as err:  # torch.onnx raises many types (UnsupportedOperatorError, RuntimeError from the tracer...)
                raise StepError(ctx.step, f"torch.onnx.export failed at opset {params.opset}: {type(err).__name__}: {one_line(err)[:400]}") from None
            del model, args  # the torch weights: the ONNX copy is loaded next
            return _write(exported, outputs, params, ctx.step)


def _write(exported: Path, outputs: dict[str, Path], params: ExportOnnxParams, step: str) -> dict[str, Any]:
    """Move the export into place (one file), or rewrite it as model.onnx + one data file. A model the
    exporter had to split (over protobuf's 2 GB) without external_data on fails: one file cannot hold it."""
    import os

    import onnx

    from kiln.runtime.onnx_graph import check_published, publish

    split = sorted(p.name for p in exported.parent.iterdir() if p != exported)
    facts: dict[str, Any] = {"opset": params.opset}
    if params.external_data:
        model = onnx.load(str(exported))  # the exporter's data files, however it laid them out
        facts["nodes"] = len(model.graph.node)
        publish(model, outputs["model"], step, outputs["data"])
        return facts | {"external_data": outputs["data"].stat().st_size, "simplify": SIMPLIFY_SKIPPED}
    if split:
        raise StepError(step, f"the exported ONNX is over protobuf's 2 GB limit (torch wrote {len(split)} external data files): "
                              "set options.external_data = true in the target to write it as model.onnx + model.onnx.data")
    check_published(exported, step)  # with simplify = false this file is what is published
    os.replace(exported, outputs["model"])
    facts["nodes"] = len(onnx.load(str(outputs["model"]), load_external_data=False).graph.node)
    return facts


# Why the chain of an external-data model has no simplify_onnx step (kiln.plan.chains.Planner.fp32_onnx).
SIMPLIFY_SKIPPED = ("skipped: kiln does not run onnxsim on external-data models (onnxsim's support for models over 2 GB varies "
                    "by release, and its passes hold several in-memory copies of the model)")


def _axes(tensor: dict[str, Any]) -> dict[int, str]:
    return {i: d for i, d in enumerate(tensor.get("shape") or []) if isinstance(d, str)}
