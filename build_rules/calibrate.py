"""calibrate: run the fp32 ONNX model over the calibration data and stream every weight layer's
activation input into kiln's native observers (min/max and a 2048-bin |x| histogram per tensor).

Memory is one batch of activations plus the histograms: each batch's tensors are folded into the
observers and dropped before the next batch runs (onnxruntime's calibrators keep every batch until
the end). The artifact, calibration.json, holds per-tensor min, max and histogram, from which any
method (minmax, percentile, entropy) derives ranges later; so its key is model, data and these
params only, and every static target of the model shares it whatever its method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import StepError
from kiln.runtime.onnxrt import session
from kiln.rules import Params, Rule, RunContext, register

# Fixed, so the activations (hence the histograms' bytes) do not depend on the machine's core count.
THREADS = 2


class CalibrateParams(Params):
    inputs: list[dict[str, Any]]
    batch_size: int
    max_length: int
    max_samples: int | None = None
    bins: int = 2048
    op_types: list[str] = ["MatMul", "Gemm"]


@register
class Calibrate(Rule):
    name = "calibrate"
    version = 1
    tools = ("onnx", "onnxruntime", "tokenizers", "transformers", "numpy")
    Params = CalibrateParams
    memory_base_mib = 1536  # one batch of every observed activation, plus onnxruntime's arena

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: CalibrateParams, ctx: RunContext) -> dict[str, Any]:

        from kiln.native.calibration import Calibration
        from kiln.runtime.data import batch_axis, batches, sample_count
        from kiln.runtime.onnx_graph import load, weight_layers, with_outputs

        model = load(inputs["model"][0])
        observed = sorted({layer.activation for layer in weight_layers(model, params.op_types)})
        if not observed:
            raise StepError(ctx.step, f"the model has no {'/'.join(params.op_types)} node with a weight initializer: nothing to calibrate or quantize")
        sess = session(with_outputs(model, observed), optimize=False, threads=THREADS)
        calibration = Calibration(params.bins)
        samples = 0
        axes = {spec["name"]: batch_axis(spec) for spec in params.inputs}
        for feed in batches(inputs["data"][0], inputs.get("source"), params.inputs, params.batch_size, params.max_length, params.max_samples):
            for name, value in zip(observed, sess.run(observed, feed), strict=True):
                calibration.update(name, value)
            samples += sample_count(feed, axes)  # along the batch axis, wherever the manifest puts it
        nan = {name: obs.nan_count for name, obs in calibration.observers.items() if obs.nan_count}
        if nan:
            raise StepError(ctx.step, f"the fp32 model gives NaN on the calibration data in {len(nan)} tensors (first {min(nan)!r}: {nan[min(nan)]} values)")
        outputs["calibration"].write_text(calibration.to_json() + "\n")
        return {"tensors": len(observed), "samples": samples, "bins": params.bins}

