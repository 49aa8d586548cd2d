"""reference_outputs: run the source model on the validation data once; save inputs and outputs.

Every target's validation compares against this file, so the source model runs once per build no
matter how many targets there are, and changing a threshold reruns only the (fast) comparison.
Layout (SafeTensors written by kiln.safetensors, deterministic bytes): "<batch>/in/<input>" and "<batch>/out/<output>".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
        return (*cls.tools, "scikit-learn") if params["source"]["kind"] == "sklearn" else cls.tools

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ReferenceOutputsParams, ctx: RunContext) -> dict[str, Any]:
        from kiln.safetensors import save_file

        tensors: dict = {}
        samples = 0
        for index, (feed, result) in enumerate(_run_source(inputs, params, ctx)):
            _require_finite(result, index, inputs["data"][0], ctx)
            samples += len(next(iter(feed.values())))
            tensors.update({f"{index:05d}/in/{name}": value for name, value in feed.items()})
            tensors.update({f"{index:05d}/out/{name}": value for name, value in result.items()})
        save_file(tensors, str(outputs["outputs"]))
        return {"samples": samples, "batches": index + 1}


def _require_finite(result: dict, batch: int, data: Path, ctx: RunContext) -> None:
    """A reference with NaN or Inf would make every comparison meaningless: fail here, naming it."""
    import numpy as np

    from kiln.errors import StepError

    for name, value in result.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            raise StepError(ctx.step, f"the source model's output {name!r} has {bad} NaN/Inf values on batch {batch} of {data.name}: there is nothing valid to compare artifacts with")


def _run_source(inputs: dict[str, list[Path]], params: ReferenceOutputsParams, ctx: RunContext):
    """Yield (feed, outputs) per batch, from the original model in its own framework."""
    import numpy as np

    from kiln.data import batches

    feeds = batches(inputs["data"][0], inputs["source"], params.inputs, params.batch_size, params.max_length, params.max_samples)
    output_names = [t["name"] for t in params.outputs]
    if params.source["kind"] == "onnx":
        from kiln.onnx_runtime import session

        sess = session(inputs["source"][0], optimize=False)
        for feed in feeds:
            yield feed, dict(zip(output_names, sess.run(output_names, feed)))
        return
    if params.source["kind"] == "sklearn":
        yield from _run_sklearn(feeds, inputs, params, output_names, ctx)
        return
    import torch

    from kiln.sources import load_torch_model

    model = load_torch_model(params.source, inputs["source"], [t["name"] for t in params.inputs], output_names, ctx.root)
    with torch.inference_mode():
        for feed in feeds:
            result = model(*(torch.from_numpy(feed[t["name"]]) for t in params.inputs))
            yield feed, {name: np.ascontiguousarray(value.numpy()) for name, value in zip(output_names, result)}


def sklearn_results(estimator, features) -> tuple:
    """What the estimator computes, in skl2onnx's output order: a classifier's labels then class
    probabilities; a clusterer's labels then distances; a regressor's predictions; a transformer's
    output."""
    if hasattr(estimator, "predict_proba"):
        return estimator.predict(features), estimator.predict_proba(features)
    if hasattr(estimator, "predict") and hasattr(estimator, "transform"):
        return estimator.predict(features), estimator.transform(features)
    if hasattr(estimator, "predict"):
        return (estimator.predict(features),)
    return (estimator.transform(features),)


def _run_sklearn(feeds, inputs: dict[str, list[Path]], params: ReferenceOutputsParams, output_names: list[str], ctx: RunContext):
    """The estimator itself on each batch; results shaped like the manifest's outputs (a regressor's
    [batch] predictions as [batch, 1] where the manifest says so, as skl2onnx outputs them)."""
    import numpy as np

    from kiln.errors import StepError
    from kiln.sources import load_sklearn_model

    estimator = load_sklearn_model(params.source, inputs["source"], ctx.root)
    declared = {t["name"]: t for t in params.outputs}
    for feed in feeds:
        results = sklearn_results(estimator, feed[params.inputs[0]["name"]])
        if len(results) != len(output_names):
            raise StepError(ctx.step, f"{type(estimator).__name__} gives {len(results)} outputs but the manifest declares {len(output_names)}: {output_names}")
        shaped = {}
        for name, value in zip(output_names, results):
            value = np.asarray(value)
            shape = declared[name].get("shape")
            if shape is not None and value.ndim == len(shape) - 1:
                value = value.reshape(*value.shape, 1)
            shaped[name] = np.ascontiguousarray(value.astype(declared[name]["dtype"]))
        yield feed, shaped
