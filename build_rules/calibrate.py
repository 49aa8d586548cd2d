"""calibrate: run the fp32 ONNX model over the calibration data and stream every weight layer's
activation input into kiln's native observers (min/max and a 2048-bin |x| histogram per tensor).

Memory is one batch of activations plus the histograms: each batch's tensors are folded into the
observers and dropped before the next batch runs (onnxruntime's calibrators keep every batch until
the end). The artifact, calibration.json, holds per-tensor min, max and histogram, from which any
method (minmax, percentile, entropy) derives ranges later; so its key is model, data and these
params only, and every static target of the model shares it whatever its method.

When the step also has a "channels" output, it writes channels.json beside it: each observed
tensor's max |x| per channel (the last axis) over every batch, which activation smoothing
(build_rules/smooth_onnx.py) needs and a per-tensor histogram cannot give. Folded batch by batch
as well, so it costs one |x| temporary of a batch and K floats per tensor.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

from kiln.errors import StepError
from kiln.runtime.onnxrt import session
from kiln.rules import Params, Rule, RunContext, register

# Fixed, so the activations (hence the histograms' bytes) do not depend on the machine's core count.
THREADS = 2
# Tensors of a batch folded at once (the native kernels release the GIL). The counts do not depend
# on it: each tensor's observer still sees its batches one at a time, in order.
FOLD_THREADS = 2


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
    version = 2  # 2: the optional "channels" output (per-channel |x| maxima)
    tools = ("onnx", "onnxruntime", "tokenizers", "transformers", "numpy")
    Params = CalibrateParams
    cost = 3
    memory_base_mib = 1536  # one batch of every observed activation, plus onnxruntime's arena

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: CalibrateParams, ctx: RunContext) -> dict[str, Any]:

        import onnx

        from kiln.runtime.onnx_graph import weight_layers

        # The graph without its weights: weight_layers reads initializer shapes and types only, and
        # a model over 2 GB could not be serialized whole for the session anyway (observing_session).
        model = onnx.load(str(inputs["model"][0]), load_external_data=False)
        observed = sorted({layer.activation for layer in weight_layers(model, params.op_types)})
        if not observed:
            raise StepError(ctx.step, f"the model has no {'/'.join(params.op_types)} node with a weight initializer: nothing to calibrate or quantize")
        with observing_session(model, inputs["model"], observed, outputs["calibration"].parent) as sess:
            return self._observe(sess, observed, inputs, outputs, params, ctx)

    @staticmethod
    def _observe(sess, observed: list[str], inputs: dict[str, list[Path]], outputs: dict[str, Path], params: CalibrateParams, ctx: RunContext) -> dict[str, Any]:
        channels = ChannelMaxima(ctx.step) if "channels" in outputs else None
        calibration, samples = observe_batches(lambda feed: zip(observed, sess.run(observed, feed), strict=True), inputs, params, ctx.step, ctx.progress, channels)
        outputs["calibration"].write_text(calibration.to_json() + "\n")
        facts = {"tensors": len(observed), "samples": samples, "bins": params.bins}
        if channels is not None:
            outputs["channels"].write_text(channels.to_json() + "\n")
            facts["channel_tensors"] = len(channels.maxima)
        return facts


class ChannelMaxima:
    """Running max |x| per channel (the last axis) of each tensor over a stream of batches. Tensors
    with fewer than 2 dims, or no values, have no channel axis to speak of and are left out."""

    def __init__(self, step: str):
        self.step = step
        self.maxima: dict = {}  # tensor name -> float32 array [channels]

    def update(self, name: str, value) -> None:
        import numpy as np

        if value.ndim < 2 or value.size == 0:
            return
        # NaN propagates into the maxima; observe_batches fails the step on any NaN anyway. Two
        # reductions rather than np.abs(value).max: no batch-sized temporary (3x faster on BERT).
        rows = value.reshape(-1, value.shape[-1])
        batch_max = np.maximum(rows.max(axis=0), -rows.min(axis=0)).astype(np.float32)
        seen = self.maxima.get(name)
        if seen is None:
            self.maxima[name] = batch_max
        elif seen.shape != batch_max.shape:
            raise StepError(self.step, f"tensor {name!r} has {batch_max.size} channels (last axis) in one calibration batch and {seen.size} in an earlier one: per-channel maxima need a fixed last axis")
        else:
            np.maximum(seen, batch_max, out=seen)

    def to_json(self) -> str:
        """{tensor: [max |x| per channel]}: sorted keys, each float32 written as its exact double
        (an Inf as JSON's non-standard Infinity, as calibration.json does), so the bytes are reproducible."""
        import json

        return json.dumps({name: [float(v) for v in m] for name, m in sorted(self.maxima.items())}, sort_keys=True, separators=(",", ":"))


def observe_batches(observe, inputs: dict[str, list[Path]], params, step: str, progress=None, channels: ChannelMaxima | None = None):
    """Fold the model's observed tensors over the [calibration] data (inputs["data"], read by kiln's
    loader; inputs["source"]: the tokenizer, if any) into kiln's native observers, one batch at a
    time. observe(feed) -> (tensor name, value) pairs for one batch; params: the calibration
    settings (inputs, batch_size, max_length, max_samples, bins). Returns the Calibration and the
    number of samples; a tensor that held NaN fails the step (no range could be trusted).
    progress(batches done): RunContext.progress, for the terminal. channels: also folds every tensor
    into these per-channel maxima."""
    from kiln.native.calibration import Calibration
    from kiln.runtime.data import batch_axis, batches, sample_count

    calibration = Calibration(params.bins)
    samples = 0
    axes = {spec["name"]: batch_axis(spec) for spec in params.inputs}
    with ThreadPoolExecutor(FOLD_THREADS, thread_name_prefix="kiln-calibrate") as pool:
        for done, feed in enumerate(batches(inputs["data"][0], inputs.get("source"), params.inputs, params.batch_size, params.max_length, params.max_samples), 1):
            fold_batch(observe(feed), calibration, channels, pool)
            samples += sample_count(feed, axes)  # along the batch axis, wherever the manifest puts it
            if progress is not None:
                progress(done)
    nan = {name: obs.nan_count for name, obs in calibration.observers.items() if obs.nan_count}
    if nan:
        raise StepError(step, f"the fp32 model gives NaN on the calibration data in {len(nan)} tensors (first {min(nan)!r}: {nan[min(nan)]} values)")
    return calibration, samples


def fold_batch(pairs, calibration, channels: ChannelMaxima | None, pool) -> None:
    """Folds one batch's (tensor name, value) pairs into the observers (and channel maxima), the
    tensors spread over the pool's threads; returns when all are in. A name seen twice in one batch
    is folded by one thread, in order, so every observer's result is the serial one."""
    by_name: dict[str, list] = {}
    for name, value in pairs:
        by_name.setdefault(name, []).append(value)
    for name in by_name:
        calibration.observer(name)  # created here, not racing in the threads

    def fold(item) -> None:
        name, values = item
        for value in values:
            calibration[name].update(value)
            if channels is not None:
                channels.update(name, value)

    for _ in pool.map(fold, by_name.items()):
        pass  # re-raises a thread's exception here


@contextlib.contextmanager
def observing_session(model, files: list[Path], observed: list[str], scratch: Path) -> Iterator[Any]:
    """An onnxruntime session of `model` with the observed tensors added as outputs. A model whose
    weights are in external data files (model.onnx + model.onnx.data) gets its changed graph written
    into a private folder beside hard links to those files (a copy where links are not possible), so
    onnxruntime reads the weights from disk: never one serialized protobuf, which cannot exceed 2 GB."""
    from kiln.runtime.onnx_graph import external_locations, with_outputs

    locations = external_locations(model)
    if not locations:
        yield session(with_outputs(model, observed), optimize=False, threads=THREADS)
        return
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".kiln-calibrate-") as tmp:
        for name in locations:
            source = files[0].parent / name
            try:
                os.link(source, Path(tmp) / name)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(source, Path(tmp) / name)
        graph = Path(tmp) / "model.onnx"
        graph.write_bytes(with_outputs(model, observed))
        yield session(graph, optimize=False, threads=THREADS)
