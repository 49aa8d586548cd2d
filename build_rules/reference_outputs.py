"""reference_outputs: run the source model on the validation data once; save inputs and outputs.

Every target's validation compares against this file, so the source model runs once per build no
matter how many targets there are, and changing a threshold reruns only the (fast) comparison. The
model runs in its own framework, as its source kind says (kiln.sources.<kind>.run_reference).
Layout (SafeTensors written by kiln.native.safetensors, deterministic bytes): "<batch>/in/<input>" and "<batch>/out/<output>".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import StepError
from kiln.rules import TORCH_MODEL_MEMORY, Params, Rule, RunContext, register


class ReferenceOutputsParams(Params):
    source: dict[str, Any]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    batch_size: int
    max_length: int
    max_samples: int | None = None


@register
class ReferenceOutputs(Rule):
    name = "reference_outputs"
    version = 1
    tools = ("torch", "transformers", "tokenizers", "onnxruntime", "numpy")
    Params = ReferenceOutputsParams
    memory_base_mib, memory_per_input = TORCH_MODEL_MEMORY

    @classmethod
    def tools_for(cls, params: dict[str, Any]) -> tuple[str, ...]:
        from kiln.sources import source_kind

        return source_kind(params["source"]["kind"]).reference_tools

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ReferenceOutputsParams, ctx: RunContext) -> dict[str, Any]:
        from kiln.native.safetensors import save_file
        from kiln.runtime.data import batches
        from kiln.sources import source_kind

        feeds = batches(inputs["data"][0], inputs["source"], params.inputs, params.batch_size, params.max_length, params.max_samples)
        run = source_kind(params.source["kind"]).run_reference(feeds, inputs["source"], params.source, params.inputs, params.outputs, ctx)
        tensors: dict = {}
        samples = 0
        for index, (feed, result) in enumerate(run):
            _require_finite(result, index, inputs["data"][0], ctx)
            samples += len(next(iter(feed.values())))
            tensors.update({f"{index:05d}/in/{name}": value for name, value in feed.items()})
            tensors.update({f"{index:05d}/out/{name}": value for name, value in result.items()})
        save_file(tensors, str(outputs["outputs"]))
        return {"samples": samples, "batches": index + 1}


def _require_finite(result: dict, batch: int, data: Path, ctx: RunContext) -> None:
    """A reference with NaN or Inf would make every comparison meaningless: fail here, naming it."""
    import numpy as np

    for name, value in result.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            raise StepError(ctx.step, f"the source model's output {name!r} has {bad} NaN/Inf values on batch {batch} of {data.name}: there is nothing valid to compare artifacts with")
