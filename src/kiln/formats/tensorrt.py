"""format = "tensorrt": a TensorRT engine built on an NVIDIA GPU from kiln's ONNX at the target's
precision (fp32; fp16 converted; int8 QDQ with symmetric int8 activations, as TensorRT requires),
validated with TensorRT's runtime on that GPU. Needs `pip install 'kiln[tensorrt-cu13]'` (NVIDIA driver
>= 580) or `'kiln[tensorrt-cu12]'` (docs/tensorrt.md).

Engines are specific to the GPU model and TensorRT version, which enter the build step's key
(build_tensorrt's hardware facts). A wildcard build leaves the target out where this machine has no
usable GPU (`unavailable_reason`).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from kiln.base.cuda import INSTALL, CudaUnavailable, DeviceBuffers, TensorrtLog, create, native_handle, unavailable_reason
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
    extra = ("tensorrt", "tensorrt")  # the alias of tensorrt-cu13 (pyproject.toml)
    install = INSTALL  # what a missing tensorrt tells the user: the extra for their driver's CUDA major
    validation_tools = ("tensorrt",)  # kiln.base.tools reads tensorrt.__version__ (the probe), not the metapackage's metadata
    # The fp32 gate's max_abs_diff (1e-4, measured as CPU onnxruntime vs torch) is too tight for GPU
    # fp32 kernels: with TF32 off TensorRT still fuses softmax/GELU/LayerNorm and sums in other
    # orders. Published figures: onnxruntime raised its TensorRT EP test tolerance from 1e-5 to 1e-3
    # for TensorRT >= 10.4 (microsoft/onnxruntime#22321); TensorRT's team told Torch-TensorRT to
    # expect up to 5e-3 from TensorRT 10's new kernels (pytorch/TensorRT#3053, randn inputs);
    # fp32 engines vs onnxruntime measured 4.2e-5 and 2.2e-4 max |diff| (NVIDIA/TensorRT#3292,
    # #2691). 1e-3 until the first GPU run measures bert (docs/tensorrt.md); the cosine gates stay.
    threshold_defaults = {"fp32": {"max_abs_diff": 1e-3}}

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
        copied back. The runner's close() (validate calls it, pass or fail; a weakref.finalize does it
        otherwise) frees the context, the engine, the device buffers and the stream."""
        device, step, names = artifact.device or 0, artifact.step, artifact.outputs
        reason = unavailable_reason(device)
        if reason:
            raise RuntimeUnavailable(f"TensorRT engines run on an NVIDIA GPU: {reason}")
        import tensorrt as trt

        try:  # first: it makes `device` current, and TensorRT deserializes onto the current device
            buffers = DeviceBuffers(device)
        except CudaUnavailable as err:
            raise StepError(step, f"CUDA could not start on device {device}: {err}") from None
        held: dict[str, Any] = {}
        try:
            held.update(_load_engine(trt, artifact, buffers))
        except BaseException:
            buffers.close()
            raise
        run = _engine_runner(trt, held, buffers, names, step)
        close = _closer(held, buffers)
        run.close = close  # type: ignore[attr-defined]
        weakref.finalize(run, close)
        return run


def _load_engine(trt, artifact: Artifact, buffers: DeviceBuffers) -> dict[str, Any]:
    """The deserialized engine and its execution context, or a StepError saying why not."""
    step = artifact.step
    log = TensorrtLog()
    logger = log.logger(trt)

    def fail(message: str):
        raise StepError(step, message)

    runtime = create(lambda: trt.Runtime(logger), "Runtime", log, fail)
    engine = runtime.deserialize_cuda_engine(artifact.path.read_bytes())
    if engine is None:
        said = log.summary()
        raise StepError(step, f"TensorRT cannot load {artifact.path.name} (built for another GPU or TensorRT version?)" + (f": {said}" if said else ""))
    context = engine.create_execution_context()
    if context is None:  # TensorRT could not allocate the context's activation memory
        said = log.summary()
        raise StepError(step, f"TensorRT could not create an execution context for {artifact.path.name} on device {buffers.ordinal} "
                              f"(out of GPU memory?)" + (f": {said}" if said else ""))
    tensors = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in tensors if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in tensors if n not in inputs]
    require_outputs(set(outputs), artifact.outputs, "TensorRT", step)
    # the context first: TensorRT wants a context destroyed before its engine (dict order is close order)
    return {"context": context, "engine": engine, "runtime": runtime, "inputs": inputs, "outputs": outputs, "log": log}


def _engine_runner(trt, held: dict[str, Any], buffers: DeviceBuffers, names: list[str], step: str) -> Runner:
    import numpy as np

    def run(feed: dict) -> dict:
        if buffers.closed:
            raise StepError(step, "the TensorRT runner was closed")
        context, engine = held["context"], held["engine"]
        try:
            buffers.activate()  # CUDA's current device is per thread
            for name in held["inputs"]:
                array = np.ascontiguousarray(feed[name], dtype=trt.nptype(engine.get_tensor_dtype(name)))
                if not context.set_input_shape(name, array.shape):
                    raise StepError(step, f"input {name!r} of shape {list(array.shape)} is outside the engine's optimization profile; widen the target's profile")
                context.set_tensor_address(name, buffers.upload(name, array))
            results = {}
            for name in held["outputs"]:
                results[name] = np.empty(tuple(context.get_tensor_shape(name)), dtype=trt.nptype(engine.get_tensor_dtype(name)))
                context.set_tensor_address(name, buffers.pointer(name, results[name].nbytes))
            if not context.execute_async_v3(native_handle(buffers.stream)):
                said = held["log"].summary()
                raise StepError(step, "TensorRT failed to run the engine" + (f": {said}" if said else ""))
            buffers.synchronize()
            for name, array in results.items():
                buffers.download(name, array)
        except CudaUnavailable as err:
            raise StepError(step, f"CUDA error while running the engine: {err}") from None
        return {name: results[name] for name in names}

    return run


def _closer(held: dict[str, Any], buffers: DeviceBuffers):
    """Free what a runner holds, once: the context, then the engine and runtime (dropping the last
    reference destroys them), then the device buffers and the stream."""
    def close() -> None:
        for key in list(held):
            held.pop(key)
        buffers.close()

    return close
