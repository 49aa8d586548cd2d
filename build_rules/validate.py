"""validate: run the artifact on the validation inputs, compare with the reference outputs, gate,
and publish. A failed gate fails the build and nothing is published (compare optimum#1755, which
only logs a warning and keeps the model).

Where the format's runtime does not exist here: a runner that could check the artifact without
running it (Core ML off macOS) raises StructuralOnly once every check passed, and the artifact is
published as "validated": "structural" with those checks and no metrics; any other missing runtime
fails unless the target sets allow_unvalidated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.base.fsio import copy_artifact
from kiln.base.quiet import alone
from kiln.errors import StepError, one_line
from kiln.rules import Params, Rule, RunContext, register
from kiln.runtime.runners import Artifact, RuntimeUnavailable, StructuralOnly, close_runner
from kiln.runtime.probes import defer
from kiln.runtime.reference import ReferenceSet, select_metrics


class ValidateParams(Params):
    model: str | None = None  # the manifest's model: names whose build/<model>/<target>/ this publishes to
    target: str
    format: str
    precision: str
    hardware: str
    metrics: list[str]
    outputs: list[str]
    thresholds: dict[str, float | None]
    padding_mask: str | None = None  # an input whose zeros mark padding rows, left out of the metrics
    # Formats run in torch (safetensors, pytorch) need the source architecture; ONNX ones do not, and leave
    # these unset so a source change reaches them only through their model input.
    source: dict[str, Any] | None = None
    inputs: list[dict[str, Any]] | None = None
    allow_unvalidated: bool = False  # publish when no runtime for the format exists here (report: "not validated")
    device: int | None = None  # tensorrt: the CUDA device the engine runs on
    # Formats that check the artifact's tensors against the manifest (coreml): the declared outputs'
    # dtypes and shapes, and the target's options that check needs. Unset for every other format.
    output_specs: list[dict[str, Any]] | None = None
    format_options: dict[str, Any] | None = None


@register
class Validate(Rule):
    name = "validate"
    # 4: integer outputs counted (mismatched) and, for fp32 artifacts, required to match exactly
    # 5: validation.json also holds "distributions": per output, histograms of the rows' errors
    version = 5
    tools = ("numpy",)  # and the runtime the format is validated in (tools_for)
    Params = ValidateParams
    cost = 2

    @classmethod
    def tools_for(cls, params: dict[str, Any]) -> tuple[str, ...]:
        from kiln.formats import target_format

        return (*target_format(params["format"]).validation_tools, *cls.tools)

    @classmethod
    def hardware_for(cls, params: dict[str, Any]) -> dict[str, Any] | None:
        """Where the format's runtime may exist or not (Core ML: macOS only), whether it exists here:
        a result checked structurally on Linux is then not up to date on a Mac, which reruns it with
        the reason "hardware changed". None for every other format, so their keys stay as they were."""
        from kiln.formats import target_format

        return target_format(params["format"]).validation_hardware()

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ValidateParams, ctx: RunContext) -> dict[str, Any]:
        from kiln.formats import target_format
        from kiln.runtime.metrics import failures

        fmt = target_format(params.format)
        try:
            run = fmt.open_runner(Artifact(inputs["model"][0], params.outputs, ctx.step, params.source, inputs.get("source"),
                                           params.inputs, ctx.root, params.device, params.precision, params.output_specs, params.format_options))
        except StructuralOnly as err:
            return self._structural(str(err), err.checks, inputs, outputs, params)
        except RuntimeUnavailable as err:
            return self._unvalidated(str(err), inputs, outputs, params, ctx)
        try:
            refs = ReferenceSet(inputs["reference"][0], params.outputs, params.padding_mask, ctx.step)
            measured = refs.measure(run, progress=ctx.progress)
        finally:
            close_runner(run)
        per_output, samples = measured.per_output, refs.samples
        first_feed = refs.batches[0][0] if refs.batches else None
        metrics = {name: select_metrics(m.summary(), params.metrics) for name, m in per_output.items()}
        gates = {k: v for k, v in params.thresholds.items() if v is not None}
        report = {"target": params.target, "samples": samples, "thresholds": gates, "metrics": metrics}
        failed = failures(metrics, gates, exact_integers=params.precision == "fp32")
        if failed:
            raise StepError(ctx.step, "validation failed, artifact not published: " + "; ".join(failed), facts=report | {"passed": False})
        # the row histograms go to validation.json only (the HTML report draws them): the step's
        # record, and so report.json, keeps the small summaries
        distributions = {name: m.distribution() for name, m in per_output.items()}
        _publish(inputs, outputs, report | {"passed": True, "distributions": distributions})
        latency = _latency(fmt, params.format, inputs["model"][0], first_feed, refs.axes["inputs"], ctx) if first_feed else None
        return report | {"passed": True} | ({"latency": latency} if latency else {})

    @staticmethod
    def _structural(reason: str, checks: dict[str, Any], inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ValidateParams) -> dict[str, Any]:
        """The runtime does not exist here but every structural check passed (a mismatch raised
        StepError): published, saying exactly that. "passed" covers those checks only; there are no
        metrics because nothing ran."""
        report = {"target": params.target, "validated": "structural", "not_validated": reason, "structural_checks": checks, "passed": True}
        _publish(inputs, outputs, report)
        return report

    @staticmethod
    def _unvalidated(reason: str, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ValidateParams, ctx: RunContext) -> dict[str, Any]:
        """No runtime for this format here: publish only when the manifest accepts that."""
        if not params.allow_unvalidated:
            raise StepError(ctx.step, f"not validated: {reason}; artifact not published (set targets.{params.target}.allow_unvalidated = true to publish it unvalidated)",
                            facts={"target": params.target, "validated": False, "not_validated": reason, "passed": False})
        report = {"target": params.target, "validated": False, "not_validated": reason, "passed": None}
        _publish(inputs, outputs, report)
        return report


def _publish(inputs: dict[str, list[Path]], outputs: dict[str, Path], report: dict) -> None:
    """The artifact, its companions (OpenVINO's model.bin, TensorRT's timing cache: the model
    input's other files, in the order of the other output roles) and validation.json. An artifact
    that is a folder (model.mlpackage, a SavedModel) is published as a folder of the same files
    (copy_artifact); the step runner moves it into place whole."""
    companions = [role for role in outputs if role not in ("artifact", "validation")]
    for source, role in zip(inputs["model"], ["artifact", *companions], strict=False):
        copy_artifact(source, outputs[role])
    outputs["validation"].write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def _latency(fmt: Any, format_name: str, artifact: Path, feed: dict, axes: dict[str, int | None], ctx: RunContext) -> dict[str, Any] | None:
    """The report-only latency on the first validation sample. It runs after publishing and can fail
    nothing: when it cannot run, the report says why ({"skipped": reason}). Measured only while no
    other step of the build runs (kiln.base.quiet); else left for the end of the build
    (kiln.runtime.probes), so that a neighbour's load is never reported as this artifact's speed."""
    from kiln.formats.base import TargetFormat
    from kiln.runtime.data import first_sample

    if getattr(fmt.latency, "__func__", None) is TargetFormat.latency:
        return None  # the format measures no latency: nothing to wait for, nothing to defer
    sample = first_sample(feed, axes)
    with alone(ctx.root) as quiet:
        if quiet:
            return probe(fmt, artifact, sample)
    return defer(ctx.root, ctx.step, format_name, artifact, sample)


def probe(fmt: Any, artifact: Path, sample: dict) -> dict[str, Any] | None:
    """fmt.latency, or {"skipped": why} when it cannot run."""
    try:
        return fmt.latency(artifact, sample)
    except Exception as err:  # onnxruntime raises its own types; a probe must never fail a validated target
        return {"skipped": f"latency not measured: {one_line(err)}"}
