"""format = "onnx": the fp32 ONNX export (torch.onnx.export, or the source's own ONNX), simplified
with onnxsim, and from it fp16 (onnxruntime's float16 converter), int8 (dynamic, or static QDQ from
kiln's calibration) and int4 (MatMulNBits) models; validated in onnxruntime on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, model_validator

from kiln.errors import StepError, one_line
from kiln.formats.base import TargetFormat
from kiln.runtime.onnxrt import session
from kiln.runtime.reference import concurrent_runner
from kiln.runtime.runners import Artifact, Runner, onnx_latency, require_outputs
from kiln.schema.fields import MAX_OPSET, MIN_OPSET, CrossError, ExportOptions, TargetBase, check_option_precisions

if TYPE_CHECKING:
    from kiln.plan.chains import Planner
    from kiln.plan.steps import Step


# What dynamic int8 quantizes unless options.op_types says otherwise (see build_rules/quantize_dynamic.py).
DYNAMIC_OP_TYPES = ["Attention", "LSTM", "MatMul"]


class OnnxOptions(ExportOptions):
    keep_io_types: bool = Field(True, description="fp16: keep the model's float inputs and outputs fp32")
    keep_fp32_ops: list[Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]] = Field([], description="fp16: op types to keep in fp32, e.g. [\"Softmax\"]")
    quantization: Literal["dynamic", "static"] = Field("dynamic", description="int8: 'dynamic' quantizes activations at run time; 'static' uses ranges calibrated on [calibration].data (QDQ)")
    calibration: Literal["minmax", "percentile", "entropy", "mse"] = Field(
        "percentile", description="int8 static: how calibrated histograms become activation ranges ('mse': per tensor, the range "
                                  "that minimizes the expected squared quantization error, clipping against rounding)")
    percentile: float = Field(99.999, gt=0.0, le=100.0, description="int8 static, calibration = 'percentile': the share of |x| kept inside the range")
    activation_type: Literal["uint8", "int8"] = Field("uint8", description="int8 static: activation type (uint8 is asymmetric, the fast path on x86 CPUs)")
    exclude_nodes: list[Annotated[str, Field(min_length=1)]] = Field([], description="int8/int4: graph node names left in fp32 (per-layer fallback for sensitive layers)")
    op_types: list[Literal["MatMul", "Conv", "LSTM", "Attention"]] = Field(
        DYNAMIC_OP_TYPES, min_length=1,
        description="int8 dynamic: op types whose weights become int8, inside If/Loop/Scan bodies too (MatMul covers Gemm; Conv runs slower than fp32 on CPU, so it is left out by default)")
    block_size: int = Field(32, description="int4: weights per quantization block along K (16, 32, 64, 128 or 256)")
    symmetric: bool = Field(False, description="int4: symmetric blocks (no zero points); false stores a zero point per block")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(4, description="int4: MatMulNBits accuracy_level (4: int8 activations in the kernel, fastest on CPU; 0: fp32 activations)")
    embeddings: Literal["fp32", "int8", "int4"] = Field(
        "int8", description="int8/int4: large embedding tables (a Gather on a 2-D float weight of 65536+ values, not shared with a MatMul) "
                            "stored in 8- or 4-bit blocks (onnxruntime's GatherBlockQuantized); 'fp32' keeps them")
    smoothing: float | None = Field(
        None, gt=0.0, le=1.0, description="int8: SmoothQuant alpha (0.5-0.8 typical): moves activation outliers into the per-channel "
                                          "weights before quantizing, from the [calibration] data's per-channel maxima; unset: off")
    fallback: Literal["none", "auto"] = Field(
        "none", description="int8/int4: 'auto' keeps the layers a per-layer sensitivity scan finds most damaging in higher precision "
                            "(int8: fp32; int4: 8-bit blocks), fewest first, until the target's gates pass on the validation data")
    scan_samples: int = Field(64, ge=1, description="fallback = 'auto': validation samples each run of the sensitivity scan sees")

    @model_validator(mode="after")
    def _block_size_is_a_power_of_two(self) -> "OnnxOptions":
        if self.block_size not in (16, 32, 64, 128, 256):
            raise CrossError("block_size", self.block_size, "one of 16, 32, 64, 128, 256")
        return self


# Which precision each option applies to: setting one for another precision is a mistake worth naming.
OPTION_PRECISIONS: dict[str, tuple[str, ...]] = {
    "keep_io_types": ("fp16",), "keep_fp32_ops": ("fp16",), "quantization": ("int8",),
    "calibration": ("int8",), "percentile": ("int8",), "activation_type": ("int8",),
    "exclude_nodes": ("int8", "int4"), "op_types": ("int8",), "block_size": ("int4",), "symmetric": ("int4",), "accuracy_level": ("int4",),
    "embeddings": ("int8", "int4"), "smoothing": ("int8",), "fallback": ("int8", "int4"), "scan_samples": ("int8", "int4"),
}
STATIC_ONLY_OPTIONS = ("calibration", "percentile", "activation_type")
DYNAMIC_ONLY_OPTIONS = ("op_types",)


class OnnxTarget(TargetBase):
    format: Literal["onnx"]
    precision: Literal["fp32", "fp16", "int8", "int4"] = "fp32"
    opset: int = Field(17, ge=MIN_OPSET, le=MAX_OPSET)
    options: OnnxOptions = OnnxOptions()


class Onnx(TargetFormat):
    format = "onnx"
    Target = OnnxTarget
    validation_tools = ("onnxruntime",)

    def check(self, spec: Any, name: str, target: OnnxTarget) -> None:
        options = target.options
        check_option_precisions(name, target, OPTION_PRECISIONS)
        for option in sorted(options.model_fields_set):
            if option in STATIC_ONLY_OPTIONS and options.quantization != "static":
                raise CrossError(f"targets.{name}.options.{option}", getattr(options, option), f"no {option} with quantization = \"{options.quantization}\" (it applies to quantization = \"static\" only)")
            if option in DYNAMIC_ONLY_OPTIONS and options.quantization != "dynamic":
                raise CrossError(f"targets.{name}.options.{option}", getattr(options, option), f"no {option} with quantization = \"{options.quantization}\" (it applies to quantization = \"dynamic\" only: static int8 quantizes MatMul/Gemm)")
        if target.precision == "int8" and options.quantization == "static" and spec.calibration is None:
            raise CrossError(f"targets.{name}.options.quantization", "static", "a [calibration] table naming the calibration data (or quantization = \"dynamic\")")
        if options.smoothing is not None and spec.calibration is None:
            raise CrossError(f"targets.{name}.options.smoothing", options.smoothing, "a [calibration] table naming the data its per-channel activation maxima come from")
        if "scan_samples" in options.model_fields_set and options.fallback != "auto":
            raise CrossError(f"targets.{name}.options.scan_samples", options.scan_samples, "no scan_samples without fallback = \"auto\"")

    def chain(self, planner: Planner, name: str, target: OnnxTarget) -> None:
        """reference -> fp32 ONNX (shared) -> [smoothing] -> one conversion to the target's precision
        (with options.fallback = "auto", its own sensitivity scan when needed) -> validate."""
        reference = planner.reference(name)
        model, model_step = planner.fp32_onnx(name, target)
        options = target.options
        if target.precision == "int8" and options.smoothing is not None:
            model_step = smooth_step(planner, name, target, model, model_step)
            model = model_step.outputs["model"]
        if target.precision == "int8" and options.quantization == "static":
            model_step = quantize_static_step(planner, name, target, model, model_step, options.activation_type, reference)
        elif target.precision != "fp32":  # one conversion step from the fp32 model
            rule, params = {
                "fp16": ("convert_fp16", {"keep_io_types": options.keep_io_types, "keep_fp32_ops": sorted(options.keep_fp32_ops)}),
                "int8": ("quantize_dynamic", {"per_channel": True, "op_types": sorted(set(options.op_types))} | excluded(target)),
                "int4": ("quantize_int4", {"block_size": options.block_size, "symmetric": options.symmetric,
                                           "accuracy_level": options.accuracy_level} | excluded(target)),
            }[target.precision]
            more_inputs, deps = {}, [model_step]
            if target.precision in ("int8", "int4"):
                params["embeddings"] = options.embeddings
                scan_params = {"quantization": "dynamic" if target.precision == "int8" else "int4"}
                if target.precision == "int4":
                    scan_params |= {k: params[k] for k in ("block_size", "symmetric", "accuracy_level")}
                more_inputs, deps, params = with_fallback(planner, name, target, reference, scan_params, params, deps)
            model_step = planner.onnx_step(name, target, rule, params, model, model_step, more_inputs, deps)
        if model_step is not None:
            model = model_step.outputs["model"]
        planner.validate(name, target, model, model_step, reference, planner.onnx_companions(model, model_step))

    def open_runner(self, artifact: Artifact) -> Runner:
        try:
            sess = session(artifact.path)
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise StepError(artifact.step, f"onnxruntime cannot load {artifact.path.name}: {one_line(err)}") from None
        names = artifact.outputs
        require_outputs({o.name for o in sess.get_outputs()}, names, "ONNX", artifact.step)
        return concurrent_runner(lambda feed: dict(zip(names, sess.run(names, feed))))  # one intra-op thread: batches side by side

    def latency(self, artifact: Path, feed: dict) -> dict[str, Any] | None:
        return onnx_latency(artifact, feed)


def excluded(target: Any) -> dict:
    """exclude_nodes enters params only when set, so targets without it keep their step ids."""
    return {"exclude_nodes": sorted(target.options.exclude_nodes)} if target.options.exclude_nodes else {}


def calibrate_step(planner: Planner, name: str, model: Path, model_step: Step | None) -> Step:
    """One calibration per model + data + calibration settings, shared by every static target (ONNX
    and TensorRT alike) and by smoothing: per-tensor |x| histograms and per-channel maxima."""
    calibration = planner.spec.calibration
    return planner.add(name, "calibrate", {
        "inputs": planner.inputs, "batch_size": calibration.batch_size, "max_length": planner.max_length(calibration),
        "max_samples": calibration.max_samples, "bins": calibration.bins, "op_types": ["MatMul", "Gemm"],
    }, {"model": planner.onnx_files(model, model_step), "data": (planner.resolved.calibration_file,)} | planner.tokenizer(planner.resolved.calibration_file),
        {"calibration": "calibration.json", "channels": "channels.json"}, [model_step])


def smooth_step(planner: Planner, name: str, target: Any, model: Path, model_step: Step | None) -> Step:
    """SmoothQuant (options.smoothing = alpha): the fp32 model with activation outliers moved into the
    weights, from the calibration's per-channel maxima; what the int8 quantizer then sees."""
    calibrate = calibrate_step(planner, name, model, model_step)
    return planner.onnx_step(name, target, "smooth_onnx", {"alpha": target.options.smoothing, "op_types": ["MatMul", "Gemm"]}, model, model_step,
                             {"channels": (calibrate.outputs["channels"],)}, [model_step, calibrate])


def quantize_static_step(planner: Planner, name: str, target: Any, model: Path, model_step: Step | None, activation_type: str,
                         reference: Step | None = None) -> Step:
    """calibrate (shared, see calibrate_step) -> quantize_static (ranges from the calibration by this
    target's method; with options.fallback = "auto", its own sensitivity scan when needed)."""
    calibrate = calibrate_step(planner, name, model, model_step)
    options = target.options
    params = {"method": options.calibration, "activation_type": activation_type, "per_channel": True,
              "op_types": ["MatMul", "Gemm"]} | excluded(target)
    if options.calibration == "percentile":
        params["percentile"] = options.percentile
    inputs, deps = {"calibration": (calibrate.outputs["calibration"],)}, [model_step, calibrate]
    if getattr(options, "embeddings", "fp32") != "fp32":  # TensorRT's static targets have no such option: fp32
        params["embeddings"] = options.embeddings
    if reference is not None:
        scan_params = {"quantization": "static", "method": options.calibration, "activation_type": activation_type}
        if options.calibration == "percentile":
            scan_params["percentile"] = options.percentile
        more_inputs, deps, params = with_fallback(planner, name, target, reference, scan_params, params, deps)
        inputs |= more_inputs
    return planner.onnx_step(name, target, "quantize_static", params, model, model_step, inputs, deps)


def with_fallback(planner: Planner, name: str, target: Any, reference: Step, scan_params: dict, params: dict,
                  deps: list) -> tuple[dict, list, dict]:
    """(quantize step inputs, deps, params) with options.fallback = "auto" wired in: the gates to
    reach, and the settings of the per-layer scan (fallback["scan"]: the quantization, the slice of
    validation data, exclude_nodes) that the quantize step runs only when the all-quantized model
    misses them, on the reference file (and, static, the calibration it already has). The scan is
    remembered in the workspace by its own inputs and settings, whatever the gates (kiln.runtime.scan):
    targets quantizing alike share it. Unchanged when the target has no fallback, so its step ids
    stay what they were."""
    if getattr(target.options, "fallback", "none") != "auto":
        return {}, deps, params
    scan = scan_params | {"max_samples": target.options.scan_samples} | excluded(target)
    return {"reference": (reference.outputs["outputs"],)}, [*deps, reference], params | {"fallback": planner.budget(name) | {"scan": scan}}
