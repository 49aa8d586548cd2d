"""format = "tensorrt": a TensorRT engine built on an NVIDIA GPU from kiln's ONNX at the target's
precision (fp32; fp16 converted; int8 QDQ with symmetric int8 activations, as TensorRT requires),
validated with TensorRT's runtime on that GPU. Needs `pip install 'kiln[tensorrt]'`.

Engines are specific to the GPU model and TensorRT version, which enter the build step's key
(build_tensorrt's hardware facts). A wildcard build leaves the target out where this machine has no
usable GPU (`unavailable_reason`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from kiln.base.cuda import CudaUnavailable, DeviceBuffers, unavailable_reason
from kiln.errors import StepError
from kiln.formats.base import TargetFormat
from kiln.formats.onnx import quantize_static_step
from kiln.runtime.runners import Artifact, Runner, RuntimeUnavailable, require_outputs
from kiln.schema.fields import MAX_OPSET, MIN_OPSET, CrossError, ExportOptions, TargetBase, check_option_precisions

if TYPE_CHECKING:
    from kiln.plan.chains import Planner


class TensorrtOptions(ExportOptions):
    """How the engine is built. Precision comes from the ONNX graph it is built from (TensorRT 10's
    strongly typed networks, the only kind in TensorRT 11): fp32 and fp16 from kiln's fp32 / fp16
    ONNX, int8 from a QDQ ONNX with int8 symmetric activations calibrated on [calibration].data."""

    keep_fp32_ops: list[Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]] = Field([], description="fp16: op types kept in fp32 in the fp16 ONNX")
    calibration: Literal["minmax", "percentile", "entropy"] = Field("percentile", description="int8: how calibrated histograms become activation ranges")
    percentile: float = Field(99.999, gt=0.0, le=100.0, description="int8, calibration = 'percentile': the share of |x| kept inside the range")
    exclude_nodes: list[Annotated[str, Field(min_length=1)]] = Field([], description="int8: graph node names left unquantized")
    workspace_mib: int = Field(1024, ge=16, le=1 << 20, description="builder workspace memory pool limit, MiB")
    optimization_level: Literal[0, 1, 2, 3, 4, 5] = Field(3, description="builder optimization level (higher: longer builds, maybe faster engines)")
    tf32: bool = Field(False, description="fp32: allow TF32 matmuls (10-bit mantissa; faster on Ampere+, fails the fp32 gates on most models)")


TRT_OPTION_PRECISIONS = {"keep_fp32_ops": ("fp16",), "calibration": ("int8",), "percentile": ("int8",), "exclude_nodes": ("int8",), "tf32": ("fp32",)}


class TensorrtTarget(TargetBase):
    """A TensorRT engine (.engine) built from the matching ONNX artifact with the tensorrt package on
    an NVIDIA GPU, validated with TensorRT's runtime on that GPU. Engines are specific to the GPU
    model and TensorRT version, which enter the step key (pip install 'kiln[tensorrt]')."""

    format: Literal["tensorrt"]
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    hardware: Literal["cuda"] = Field("cuda", description="an NVIDIA GPU")
    device: int = Field(0, ge=0, le=63, description="CUDA device ordinal to build and validate on")
    opset: int = Field(17, ge=MIN_OPSET, le=MAX_OPSET, description="opset of the ONNX export it builds from")
    profile: dict[Annotated[str, Field(pattern=r"^[A-Za-z_]\w*$")], Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=3, max_length=3)]] = Field(
        {}, description="optimization profile: [min, opt, max] for every dynamic axis named in [[inputs]], e.g. { batch = [1, 8, 32], sequence = [1, 128, 128] }")
    options: TensorrtOptions = TensorrtOptions()


class Tensorrt(TargetFormat):
    format = "tensorrt"
    Target = TensorrtTarget
    extra = ("tensorrt", "tensorrt")
    validation_tools = ("tensorrt",)

    def check(self, spec: Any, name: str, target: TensorrtTarget) -> None:
        check_option_precisions(name, target, TRT_OPTION_PRECISIONS)
        axes = sorted({axis for tensor in spec.inputs for axis in tensor.dynamic_axes.values()})
        for axis in axes:
            if axis not in target.profile:
                raise CrossError(f"targets.{name}.profile", target.profile, f"a [min, opt, max] entry for every dynamic input axis {axes}; {axis!r} is missing")
        for axis, (low, opt, high) in target.profile.items():
            if axis not in axes:
                raise CrossError(f"targets.{name}.profile.{axis}", [low, opt, high], f"an axis named in the [[inputs]] shapes: {axes}")
            if not low <= opt <= high:
                raise CrossError(f"targets.{name}.profile.{axis}", [low, opt, high], "min <= opt <= max")
        if target.precision == "int8" and spec.calibration is None:
            raise CrossError(f"targets.{name}.precision", "int8", "a [calibration] table naming the calibration data (TensorRT int8 is built from a calibrated QDQ ONNX)")

    def chain(self, planner: Planner, name: str, target: TensorrtTarget) -> None:
        """The ONNX of the target's precision, shared with ONNX targets asking for the same, then the
        engine build on the GPU, validated there."""
        reference = planner.reference(name)
        model, model_step = planner.fp32_onnx(name, target)
        options = target.options
        if target.precision == "fp16":
            model_step = planner.onnx_step(name, target, "convert_fp16", {"keep_io_types": True, "keep_fp32_ops": sorted(options.keep_fp32_ops)},
                                           model, model_step)
        elif target.precision == "int8":
            model_step = quantize_static_step(planner, name, target, model, model_step, activation_type="int8")
        model = model_step.outputs["model"] if model_step is not None else model
        params = {"device": target.device, "inputs": planner.inputs, "profile": {k: list(v) for k, v in sorted(target.profile.items())},
                  "workspace_mib": options.workspace_mib, "optimization_level": options.optimization_level, "tf32": options.tf32}
        engine = planner.add(name, "build_tensorrt", params, {"model": planner.onnx_files(model, model_step)},
                             {"engine": "model.engine", "timing_cache": "timing.cache"}, [model_step])
        planner.validate(name, target, engine.outputs["engine"], engine, reference, {"timing_cache": engine.outputs["timing_cache"]})

    def validation(self, planner: Planner, name: str, target: TensorrtTarget) -> tuple[dict, dict]:
        return {"device": target.device}, {}

    def unavailable_reason(self, target: TensorrtTarget) -> str | None:
        reason = unavailable_reason(target.device)
        return f"hardware = \"cuda\" needs an NVIDIA GPU with TensorRT: {reason}" if reason else None

    def open_runner(self, artifact: Artifact) -> Runner:
        """TensorRT's runtime on the GPU the engine was built for: each batch's inputs are copied to the
        device, the engine runs with the batch's shapes (within its optimization profile), outputs are
        copied back."""
        device, step, names = artifact.device or 0, artifact.step, artifact.outputs
        reason = unavailable_reason(device)
        if reason:
            raise RuntimeUnavailable(f"TensorRT engines run on an NVIDIA GPU: {reason}")
        import numpy as np
        import tensorrt as trt

        engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(artifact.path.read_bytes())
        if engine is None:
            raise StepError(step, f"TensorRT cannot load {artifact.path.name} (built for another GPU or TensorRT version?)")
        context = engine.create_execution_context()
        tensors = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {name: engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT for name in tensors}
        require_outputs({n for n in tensors if not is_input[n]}, names, "TensorRT", step)
        buffers = DeviceBuffers(device)

        def run(feed: dict) -> dict:
            try:
                for name in (n for n in tensors if is_input[n]):
                    array = np.ascontiguousarray(feed[name], dtype=trt.nptype(engine.get_tensor_dtype(name)))
                    if not context.set_input_shape(name, array.shape):
                        raise StepError(step, f"input {name!r} of shape {list(array.shape)} is outside the engine's optimization profile; widen the target's profile")
                    context.set_tensor_address(name, buffers.upload(name, array))
                results = {}
                for name in (n for n in tensors if not is_input[n]):
                    results[name] = np.empty(tuple(context.get_tensor_shape(name)), dtype=trt.nptype(engine.get_tensor_dtype(name)))
                    context.set_tensor_address(name, buffers.pointer(name, results[name].nbytes))
                if not context.execute_async_v3(int(buffers.stream)):
                    raise StepError(step, "TensorRT failed to run the engine (see TensorRT's log above)")
                buffers.synchronize()
                for name, array in results.items():
                    buffers.download(name, array)
            except CudaUnavailable as err:
                raise StepError(step, f"CUDA error while running the engine: {err}") from None
            return {name: results[name] for name in names}

        return run
