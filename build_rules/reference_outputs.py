"""reference_outputs: run the source model on the validation data once; save inputs and outputs.

Every target's validation compares against this file, so the source model runs once per build no
matter how many targets there are, and changing a threshold reruns only the (fast) comparison. The
model runs in its own framework, as its source kind says (kiln.sources.<kind>.run_reference).
Layout (SafeTensors written by kiln.native.safetensors, deterministic bytes): "<batch>/in/<input>" and "<batch>/out/<output>".
Where a tensor's batch axis is not axis 0 (or it has none), the metadata key "batch_axes" holds
{"inputs": {name: axis or null}, "outputs": {...}} (kiln.runtime.data.batch_axis), which validate
reads to cut rows and samples; files whose tensors are all batched on axis 0 carry no metadata, so
their bytes are those this rule wrote before batch axes existed.
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
    # text: the samples after the first `by_length_after` batched by token count (kiln.runtime.data.
    # text_batches); None: all in file order. The planner keeps the first batch, and every sample a
    # sensitivity scan reads, in file order.
    by_length_after: int | None = None


@register
class ReferenceOutputs(Rule):
    name = "reference_outputs"
    # 2: the safetensors file in the package's tensor order (int32 inputs with float32 outputs were ordered by name)
    # 3: text batched by token count after the first batches (by_length_after)
    version = 3
    tools = ("torch", "transformers", "tokenizers", "onnxruntime", "numpy")
    Params = ReferenceOutputsParams
    cost = 7  # imports torch and the model, runs the validation data
    memory_base_mib, memory_per_input = TORCH_MODEL_MEMORY

    @classmethod
    def tools_for(cls, params: dict[str, Any]) -> tuple[str, ...]:
        from kiln.sources import source_kind

        return source_kind(params["source"]["kind"]).reference_tools

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ReferenceOutputsParams, ctx: RunContext) -> dict[str, Any]:
        from kiln.native.safetensors import save_file
        from kiln.runtime.data import batch_axis, batches, sample_count
        from kiln.sources import source_kind

        read: dict[str, Any] = {}  # how the data was read (a pad token borrowed from eos): to the report
        feeds = batches(inputs["data"][0], inputs["source"], params.inputs, params.batch_size, params.max_length, params.max_samples, read, params.by_length_after)
        run = source_kind(params.source["kind"]).run_reference(feeds, inputs["source"], params.source, params.inputs, params.outputs, ctx)
        axes = {"inputs": {t["name"]: batch_axis(t) for t in params.inputs}, "outputs": {t["name"]: batch_axis(t) for t in params.outputs}}
        tensors: dict = {}
        samples = 0
        for index, (feed, result) in enumerate(run):
            _require_finite(result, index, inputs["data"][0], ctx)
            count = sample_count(feed, axes["inputs"])
            _require_declared_shapes(result, params.outputs, count, index, ctx)
            samples += count
            tensors.update({f"{index:05d}/in/{name}": value for name, value in feed.items()})
            tensors.update({f"{index:05d}/out/{name}": value for name, value in result.items()})
            ctx.progress(index + 1)  # the number of batches is known only once the data is read
        save_file(tensors, str(outputs["outputs"]), metadata=batch_axes_metadata(axes))
        # how the data was read (a pad token borrowed from eos) goes to the report
        return {"samples": samples, "batches": index + 1, **read}


def batch_axes_metadata(axes: dict[str, dict[str, int | None]]) -> dict[str, str] | None:
    """None when every tensor is batched on axis 0 (the layout validate assumes without metadata)."""
    import json

    if all(axis == 0 for group in axes.values() for axis in group.values()):
        return None
    return {"batch_axes": json.dumps(axes, sort_keys=True)}


def _require_declared_shapes(result: dict, specs: list[dict], samples: int, batch: int, ctx: RunContext) -> None:
    """Each output has its declared rank, fixed sizes and, on its batch axis, one entry per sample:
    metrics cut rows by that shape, so a wrong one would compare the wrong rows."""
    from kiln.runtime.data import batch_axis

    for spec in specs:
        shape, got = spec.get("shape"), list(result[spec["name"]].shape)
        if shape is None:
            continue
        axis = batch_axis(spec)
        expected = [samples if i == axis else dim for i, dim in enumerate(shape)]
        if len(got) != len(shape) or any(isinstance(want, int) and want != have for want, have in zip(expected, got, strict=True)):
            where = f" with {samples} samples on axis {axis}" if axis is not None else ""
            raise StepError(ctx.step, f"the source model's output {spec['name']!r} has shape {got} on batch {batch}; the manifest declares {shape}{where}")


def _require_finite(result: dict, batch: int, data: Path, ctx: RunContext) -> None:
    """A reference with NaN or Inf would make every comparison meaningless: fail here, naming it."""
    import numpy as np

    for name, value in result.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            raise StepError(ctx.step, f"the source model's output {name!r} has {bad} NaN/Inf values on batch {batch} of {data.name}: there is nothing valid to compare artifacts with")
