"""validate: run the artifact on the validation inputs, compare with the reference outputs, gate,
and publish. A failed gate fails the build and nothing is published (compare optimum#1755, which
only logs a warning and keeps the model).
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from kiln.errors import StepError, one_line
from kiln.rules import Params, Rule, RunContext, register


class ValidateParams(Params):
    target: str
    format: str
    precision: str
    hardware: str
    metrics: list[str]
    outputs: list[str]
    thresholds: dict[str, float | None]


@register
class Validate(Rule):
    name = "validate"
    version = 1
    tools = ("onnxruntime", "numpy", "safetensors")
    Params = ValidateParams

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ValidateParams, ctx: RunContext) -> dict[str, Any]:
        from kiln.metrics import OutputMetrics, failures

        per_output = {name: OutputMetrics() for name in params.outputs}
        samples = 0
        sess = _session(inputs["model"][0], params.outputs, ctx)
        for feed, expected in _reference_batches(inputs["reference"][0]):
            got = dict(zip(params.outputs, sess.run(params.outputs, feed)))
            samples += len(next(iter(feed.values())))
            for name in params.outputs:
                try:
                    per_output[name].add(expected[name], got[name])
                except ValueError as err:
                    raise StepError(ctx.step, f"output {name!r}: {err}") from None
        metrics = {name: _select(m.summary(), params.metrics) for name, m in per_output.items()}
        gates = {k: v for k, v in params.thresholds.items() if v is not None}
        report = {"target": params.target, "samples": samples, "thresholds": gates, "metrics": metrics}
        failed = failures(metrics, gates)
        if failed:
            raise StepError(ctx.step, "validation failed, artifact not published: " + "; ".join(failed), facts=report | {"passed": False})
        shutil.copyfile(inputs["model"][0], outputs["artifact"])
        outputs["validation"].write_text(json.dumps(report | {"passed": True}, indent=2, sort_keys=True) + "\n")
        return report | {"passed": True}


def _select(summary: dict, wanted: list[str]) -> dict:
    return {k: v for k, v in summary.items() if k in wanted or k in ("rows", "nonfinite")}


def _reference_batches(path: Path):
    """Yield (inputs, outputs) per batch from reference_outputs' file, in batch order."""
    from safetensors.numpy import load_file

    batches: dict[str, dict[str, dict]] = defaultdict(lambda: {"in": {}, "out": {}})
    for key, value in load_file(str(path)).items():
        batch, kind, name = key.split("/", 2)
        batches[batch][kind][name] = value
    for batch in sorted(batches):
        yield batches[batch]["in"], batches[batch]["out"]


def _session(model: Path, names: list[str], ctx: RunContext):
    from kiln.onnx_runtime import session

    try:
        sess = session(model)
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
        raise StepError(ctx.step, f"onnxruntime cannot load {model.name}: {one_line(err)}") from None
    known = {o.name for o in sess.get_outputs()}
    missing = [n for n in names if n not in known]
    if missing:
        raise StepError(ctx.step, f"output {missing[0]!r} is not in the ONNX model; it has {sorted(known)}")
    return sess
