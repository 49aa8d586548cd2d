"""format = "openvino": OpenVINO IR (model.xml + model.bin) converted from the fp32 ONNX export by
the openvino package, validated with OpenVINO's CPU runtime. fp16: weights compressed to fp16
(computed in fp32 on CPU). Needs `pip install 'kiln[openvino]'`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from kiln.errors import StepError, one_line
from kiln.formats.base import TargetFormat
from kiln.runtime.runners import Artifact, Runner, RuntimeUnavailable, require_outputs
from kiln.schema.fields import MAX_OPSET, MIN_OPSET, ExportOptions, TargetBase

if TYPE_CHECKING:
    from kiln.plan.chains import Planner


class OpenvinoTarget(TargetBase):
    """OpenVINO IR (model.xml + model.bin) converted from the ONNX export by the openvino package,
    validated with OpenVINO's CPU runtime. fp16: weights compressed to fp16 (computed in fp32 on CPU)."""

    format: Literal["openvino"]
    precision: Literal["fp32", "fp16"] = "fp32"
    opset: int = Field(17, ge=MIN_OPSET, le=MAX_OPSET, description="opset of the ONNX export it converts")
    options: ExportOptions = ExportOptions()


class Openvino(TargetFormat):
    format = "openvino"
    Target = OpenvinoTarget
    extra = ("openvino", "openvino")
    validation_tools = ("openvino",)

    def chain(self, planner: Planner, name: str, target: OpenvinoTarget) -> None:
        reference = planner.reference(name)
        model, model_step = planner.fp32_onnx(name, target)
        ir = planner.add(name, "convert_openvino", {"compress_to_fp16": target.precision == "fp16"}, {"model": planner.onnx_files(model, model_step)},
                         {"model": "model.xml", "weights": "model.bin"}, [model_step])
        planner.validate(name, target, ir.outputs["model"], ir, reference, {"weights": ir.outputs["weights"]})

    def open_runner(self, artifact: Artifact) -> Runner:
        """OpenVINO's CPU runtime, one inference thread (fixed reduction order, as for onnxruntime), and
        f32 inference precision: on CPUs with bf16 units the plugin otherwise computes in bf16 by default,
        which would gate the runtime's shortcut rather than the artifact (max abs diff 0.03 on bert)."""
        import openvino as ov

        core = ov.Core()
        if "CPU" not in core.available_devices:
            raise RuntimeUnavailable(f"OpenVINO has no CPU device on this machine (it has {core.available_devices})")
        try:
            compiled = core.compile_model(str(artifact.path), "CPU", {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
        except Exception as err:  # openvino raises RuntimeError for a bad IR
            raise StepError(artifact.step, f"OpenVINO cannot load {artifact.path.name}: {one_line(err)[:300]}") from None
        names = artifact.outputs
        require_outputs({name for output in compiled.outputs for name in output.get_names()}, names, "OpenVINO", artifact.step)
        request = compiled.create_infer_request()

        def run(feed: dict) -> dict:
            result = request.infer(feed)
            return {name: result[compiled.output(name)].copy() for name in names}

        return run
