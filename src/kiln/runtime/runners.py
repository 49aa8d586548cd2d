"""What every runner shares: the Runner type, "this runtime does not exist here", matching a model's
results to the manifest's outputs, calling a torch module, and ONNX latency.

Each format opens its own runner (kiln.formats.<format>.open_runner); validate uses them to compare
every artifact with the reference outputs of the source model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kiln.errors import StepError
from kiln.runtime.onnxrt import session

Runner = Callable[[dict], dict]  # may have a close() attribute: what it holds open (a JVM), ended by close_runner


def close_runner(run: Runner) -> None:
    """End what a runner holds open (its `close` attribute, where it has one), whether validation
    passed or failed: a failed gate's traceback keeps the runner alive, and with it a child JVM."""
    close = getattr(run, "close", None)
    if close is not None:
        close()


class RuntimeUnavailable(Exception):
    """The format's runtime does not exist on this machine (str(): why); validate then publishes the
    artifact only if the manifest accepts an unvalidated one."""


class StructuralOnly(RuntimeUnavailable):
    """The format's runtime does not exist here, but the artifact was checked as far as it can be
    without running it, and every check passed (a mismatch is a StepError instead). str(): why it
    could not run; `checks`: what was checked and found, by name. validate publishes such an
    artifact without allow_unvalidated, its validation.json saying "validated": "structural", the
    checks and the reason, with no metrics: nothing was computed, so nothing is claimed about numbers."""

    def __init__(self, reason: str, checks: dict[str, Any]):
        super().__init__(reason)
        self.checks = checks


@dataclass(frozen=True)
class Artifact:
    """What a runner is opened on: the artifact, the outputs to return, and what some formats need
    besides (the source model for weights-only formats, the input order, the GPU)."""

    path: Path
    outputs: list[str]
    step: str  # names the step in errors
    source: dict[str, Any] | None = None
    source_files: list[Path] | None = None
    inputs: list[dict] | None = None
    root: Path | None = None
    device: int | None = None
    precision: str | None = None  # the target's: weights formats check their float tensors are stored at it
    output_specs: list[dict] | None = None  # the manifest's outputs (name, dtype, shape), for formats checking their shapes
    options: dict[str, Any] | None = None  # what else a format's check needs of its target (Core ML: deployment target, bounds)

    @property
    def input_names(self) -> list[str]:
        return [t["name"] for t in self.inputs or []]


def pick_outputs(result: Any, names: list[str]) -> tuple:
    """A model's result (a dict-like of named outputs, a tuple, or one tensor) as a tuple in `names`' order."""
    if hasattr(result, "keys"):
        missing = [n for n in names if n not in result.keys()]
        if missing:
            raise StepError("source", f"output {missing[0]!r} is not produced by the model; it gives {list(result.keys())}")
        return tuple(result[n] for n in names)
    values = result if isinstance(result, (tuple, list)) else (result,)
    if len(values) != len(names):
        raise StepError("source", f"the model returns {len(values)} outputs but the manifest declares {len(names)}: {names}")
    return tuple(values)


def torch_runner(module, input_names: list[str], names: list[str]) -> Runner:
    """Call a torch module with the feed's tensors positionally (manifest order), no autograd; its
    outputs matched to `names` by position (or by name, for a dict)."""
    import torch

    def run(feed: dict) -> dict:
        with torch.inference_mode():
            result = pick_outputs(module(*(torch.from_numpy(feed[name]) for name in input_names)), names)
        return {name: value.numpy() for name, value in zip(names, result, strict=True)}

    return run


# How a weights artifact (safetensors, pytorch) stores the source's float32 tensors at each precision
# (and the dtype its config.json names).
WEIGHT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def require_precision(stored: dict[str, str], source: dict[str, str], artifact: Artifact) -> None:
    """Fail unless every tensor the source keeps in float32 is stored at the target's precision
    (dtype names without "torch."): an fp16 target holding fp32 weights, or the reverse, would
    otherwise pass validation under the wrong precision's thresholds."""
    want = WEIGHT_DTYPES.get(artifact.precision or "")
    if want is None:
        return
    for key in sorted(stored):
        if source.get(key) == "float32" and stored[key] != want:
            raise StepError(artifact.step, f"{artifact.path.name} stores {key!r} as {stored[key]}; a {artifact.precision} target stores the source's float32 weights as {want}")


def require_outputs(known: set[str], names: list[str], kind: str, step: str) -> None:
    missing = [n for n in names if n not in known]
    if missing:
        raise StepError(step, f"output {missing[0]!r} is not in the {kind} model; it has {sorted(known)}")


def onnx_latency(artifact: Path, feed: dict, runs: int = 30, threads: int = 2) -> dict[str, Any]:
    """CPU latency of one ONNX artifact on `feed` as given (validate passes the first validation
    sample: batch axis cut to 1, other axes as in the data, unbatched inputs whole): the median of
    `runs` timed runs after 5 warm-ups. No shape is invented, so the probe runs what validation ran.
    Goes to the report only: timings are not reproducible bytes. Raises what onnxruntime raises;
    the caller decides that a probe that cannot run fails nothing."""
    sess = session(artifact, threads=threads, spinning=False)
    missing = [i.name for i in sess.get_inputs() if i.name not in feed]
    if missing:
        raise ValueError(f"the validation data has no input {missing[0]!r}")
    shaped = {i.name: feed[i.name] for i in sess.get_inputs()}
    return timed(lambda: sess.run(None, shaped), shaped, runs, threads)


def timed(call: Callable[[], Any], shaped: dict, runs: int, threads: int) -> dict[str, Any]:
    """The report's latency entry for `call` (one inference on `shaped`): the median and 10th
    percentile of `runs` timed calls after 5 warm-ups, every runtime measured alike."""
    import time

    import numpy as np

    for _ in range(5):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"median_ms": round(1000 * float(np.median(times)), 3), "p10_ms": round(1000 * float(np.percentile(times, 10)), 3),
            "runs": runs, "threads": threads, "shape": {k: list(v.shape) for k, v in shaped.items()}}
