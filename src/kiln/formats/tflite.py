"""format = "tflite": a LiteRT (TensorFlow Lite) flatbuffer, converted from a TensorFlow source by
TF's TFLiteConverter (build_rules/convert_tflite.py), or from a PyTorch source (torch, huggingface)
by litert-torch in its own tool environment (build_rules/convert_tflite_torch.py; kiln.base.toolenv:
litert-torch pins typing-extensions and pydantic below what kiln and coremltools need), and validated
in the LiteRT interpreter (ai-edge-litert) against the source model. Needs pip install
'kiln[tflite]' (the runtime; a TensorFlow source needs 'kiln[tensorflow]', which includes it).

From PyTorch: fp32, fp16 and dynamic-range int8 (ai-edge-quantizer, offline), and static int8 as
below. The file keeps PyTorch's layout (NCHW) and has fixed shapes (litert-torch
0.10 cannot export a dynamic batch here): converted at batch 2, it is resized at run time by LiteRT,
and the convert step checks that it runs at another batch, failing with the reason when the graph
cannot be resized.

Precisions:
- fp32: the model as it is;
- fp16: weights stored as float16 (`target_spec.supported_types = [tf.float16]`), computed in fp32;
- int8, `options.quantization = "dynamic"` (default): dynamic-range quantization, int8 weights
  (TF quantizes weight tensors of 1024 elements or more), activations quantized at run time;
- int8, `options.quantization = "static"`: full integer, from either source framework by one path:
  the fp32 .tflite (the very step a tflite_fp32 target has) -> calibrate_tflite (LiteRT runs it over
  [calibration].data read by kiln's loader; every float activation folded into kiln's native
  observers, one calibration shared by every static target of the model) -> quantize_tflite
  (ai-edge-quantizer's static int8 recipe fed the ranges `options.calibration` derives: minmax,
  percentile (default, `options.percentile`) or entropy, as the ONNX static target).
  `options.integer_io = true` (default) makes the float inputs and outputs int8 too (the runner
  quantizes and dequantizes them with each tensor's scale and zero point); false keeps them float32.
  A static file with no int8 activation fails (at quantize and again at validation).
Only LiteRT builtin ops: a model needing TensorFlow ops through the Flex delegate (Select TF ops),
which the LiteRT runtime cannot run, fails the conversion naming them; a .tflite holding Flex ops
fails validation. An int8 or fp16 target whose file holds no int8 or float16 tensor (nothing was
quantized: every weight below TF's size limit) fails instead of passing as a float model.

Layout: the source's. Keras models take NHWC images, and the .tflite keeps exactly the signature
the manifest declares (input names, dynamic axes as -1); kiln inserts no transposes. The convert
step's facts in report.json give each input's dtype, shape and quantization as the artifact has them.

Validation runs the interpreter with one thread (a fixed reduction order, as onnxruntime's), inputs
by name through the "serving_default" signature, the batch resized per feed. Default thresholds are
the precision's (kiln.schema.fields.PRECISION_DEFAULTS): full-integer int8 on the example convnet
(manifests/keras_convnet.toml) gives min cosine ~0.999 on logits, far inside int8's 0.9 / 0.98.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from kiln.errors import StepError, one_line
from kiln.formats.base import TargetFormat
from kiln.runtime.runners import Artifact, Runner, require_outputs, timed
from kiln.schema.fields import CrossError, Strict, TargetBase, check_option_precisions
from kiln.sources.tensorflow import SERVING_SIGNATURE as SIGNATURE  # one definition; convert_tflite_torch imports it from here

if TYPE_CHECKING:
    from kiln.plan.chains import Planner


class TfliteOptions(Strict):
    quantization: Literal["dynamic", "static"] = Field("dynamic", description="int8: 'dynamic' (dynamic range: int8 weights, activations quantized at run time) or 'static' (full integer: activation ranges calibrated on [calibration].data)")
    integer_io: bool = Field(True, description="int8 static: int8 model inputs and outputs (float ones quantized with their scale and zero point); false keeps them float32")
    calibration: Literal["minmax", "percentile", "entropy"] = Field("percentile", description="int8 static: how calibrated histograms become activation ranges")
    percentile: float = Field(99.999, gt=0.0, le=100.0, description="int8 static, calibration = 'percentile': the share of |x| kept inside the range")


OPTION_PRECISIONS = {"quantization": ("int8",), "integer_io": ("int8",), "calibration": ("int8",), "percentile": ("int8",)}
STATIC_ONLY_OPTIONS = ("integer_io", "calibration", "percentile")


class TfliteTarget(TargetBase):
    """A LiteRT flatbuffer (model.tflite) from a TensorFlow source, validated in LiteRT's interpreter."""

    format: Literal["tflite"]
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    options: TfliteOptions = TfliteOptions()


class Tflite(TargetFormat):
    format = "tflite"
    Target = TfliteTarget
    extra = ("ai_edge_litert", "tflite")  # the runtime; a TensorFlow source's own extra brings the converter
    # from the model itself (kiln.define.spec): TF's converter, or litert-torch in its tool environment
    source_frameworks = frozenset({"tensorflow", "torch"})
    validation_tools = ("ai-edge-litert",)

    def check(self, spec: Any, name: str, target: TfliteTarget) -> None:
        options = target.options
        check_option_precisions(name, target, OPTION_PRECISIONS)
        for option in sorted(options.model_fields_set & set(STATIC_ONLY_OPTIONS)):
            if options.quantization != "static":
                raise CrossError(f"targets.{name}.options.{option}", getattr(options, option), f"no {option} with quantization = \"dynamic\" (it applies to quantization = \"static\" only: dynamic range keeps float inputs and outputs)")
        if "percentile" in options.model_fields_set and options.calibration != "percentile":
            raise CrossError(f"targets.{name}.options.percentile", options.percentile, f"no percentile with calibration = \"{options.calibration}\" (it applies to calibration = \"percentile\" only)")
        if target.precision == "int8" and options.quantization == "static" and spec.calibration is None:
            raise CrossError(f"targets.{name}.options.quantization", "static", "a [calibration] table naming the calibration data (or quantization = \"dynamic\")")

    def chain(self, planner: Planner, name: str, target: TfliteTarget) -> None:
        """reference -> the conversion from the source (TF's converter, or litert-torch in its tool
        environment) -> validate; static int8: the fp32 conversion (shared with a tflite_fp32 target)
        -> calibrate_tflite (shared by every static target) -> quantize_tflite -> validate."""
        reference = planner.reference(name)
        static = target.precision == "int8" and target.options.quantization == "static"
        step = conversion_step(planner, name, "fp32" if static else target.precision)
        if static:
            step = static_int8_steps(planner, name, target, step)
        planner.validate(name, target, step.outputs["model"], step, reference)

    def validation(self, planner: Planner, name: str, target: TfliteTarget) -> tuple[dict, dict]:
        """Static int8 tells validation so, which then requires int8 activations in the file; other
        targets add nothing (their step ids stay)."""
        if target.precision == "int8" and target.options.quantization == "static":
            return {"format_options": {"quantization": "static"}}, {}
        return {}, {}

    def open_runner(self, artifact: Artifact) -> Runner:
        """The LiteRT interpreter on the file, one thread; inputs by name, quantized where the model
        takes int8, outputs dequantized back to float."""
        interpreter = open_interpreter(artifact.path.read_bytes(), artifact.path.name, artifact.step)
        require_precision(tensor_dtypes(interpreter), artifact.precision, artifact.path.name, artifact.step)
        if (artifact.options or {}).get("quantization") == "static" and not int8_activations(artifact.path.read_bytes()):
            raise StepError(artifact.step, f"{artifact.path.name} holds no int8 activation: a static (full integer) int8 target must compute in int8")
        if SIGNATURE not in interpreter.get_signature_list():
            raise StepError(artifact.step, f"{artifact.path.name} has no {SIGNATURE!r} signature (it has {sorted(interpreter.get_signature_list())}): kiln feeds inputs by the signature's names")
        runner = interpreter.get_signature_runner(SIGNATURE)
        in_details, out_details = runner.get_input_details(), runner.get_output_details()
        names = artifact.outputs
        require_outputs(set(out_details), names, "TFLite", artifact.step)

        def run(feed: dict) -> dict:
            missing = [n for n in in_details if n not in feed]
            if missing:
                raise StepError(artifact.step, f"{artifact.path.name} takes input {missing[0]!r}, which the validation data does not have (it has {sorted(feed)})")
            result = runner(**{n: quantize(feed[n], d) for n, d in in_details.items()})
            return {n: dequantize(result[n], out_details[n]) for n in names}

        return run

    def latency(self, artifact: Path, feed: dict) -> dict[str, Any] | None:
        """CPU latency in LiteRT on the first validation sample, as onnx_latency measures ONNX: 2
        threads, the median of 30 runs after 5 warm-ups. Report only."""
        runner = open_interpreter(artifact.read_bytes(), artifact.name, "latency", threads=2).get_signature_runner(SIGNATURE)
        shaped = {n: quantize(feed[n], d) for n, d in runner.get_input_details().items()}
        return timed(lambda: runner(**shaped), shaped, runs=30, threads=2)


def conversion_step(planner: Planner, name: str, precision: str):
    """The conversion from the source at `precision` (int8: dynamic range): convert_tflite for a
    TensorFlow source, convert_tflite_torch (litert-torch) for a PyTorch one. Its params are the same
    for every target at that precision, so a static target's fp32 step is the tflite_fp32 target's."""
    params: dict[str, Any] = {"source": planner.source_params, "inputs": planner.inputs, "outputs": planner.outputs, "precision": precision}
    if precision == "int8":
        params["quantization"] = "dynamic"
    rule = "convert_tflite_torch" if planner.source.framework == "torch" else "convert_tflite"
    return planner.add(name, rule, params, {"source": planner.resolved.source_files}, {"model": "model.tflite"})


def static_int8_steps(planner: Planner, name: str, target: TfliteTarget, float_step):
    """calibrate_tflite (key: the float model, the data and these settings: shared by every static
    target of the model) -> quantize_tflite (this target's method and integer_io)."""
    calibration = planner.spec.calibration
    data = planner.resolved.calibration_file
    calibrate = planner.add(name, "calibrate_tflite", {
        "inputs": planner.inputs, "batch_size": calibration.batch_size, "max_length": planner.max_length(calibration),
        "max_samples": calibration.max_samples, "bins": calibration.bins,
    }, {"model": (float_step.outputs["model"],), "data": (data,)} | planner.tokenizer(data), {"calibration": "calibration.json"}, [float_step])
    options = target.options
    params: dict[str, Any] = {"method": options.calibration, "integer_io": options.integer_io}
    if options.calibration == "percentile":
        params["percentile"] = options.percentile
    return planner.add(name, "quantize_tflite", params, {"model": (float_step.outputs["model"],), "calibration": (calibrate.outputs["calibration"],)},
                       {"model": "model.tflite"}, [float_step, calibrate])


def open_interpreter(content: bytes, label: str, step: str, threads: int = 1):
    """LiteRT's interpreter on a .tflite, tensors allocated. A model with TensorFlow (Flex) ops, which
    this runtime has no delegate for, or a damaged file, is a StepError naming the cause."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_content=content, num_threads=threads)
        interpreter.allocate_tensors()
    except Exception as err:  # ValueError for a bad flatbuffer, RuntimeError for ops it cannot run
        flex = flex_ops(content)
        if flex:
            raise StepError(step, f"{label} needs TensorFlow Flex ops {flex}, which the LiteRT runtime cannot run (no Flex delegate)") from None
        raise StepError(step, f"LiteRT cannot run {label}: {one_line(err)[:300]}") from None
    return interpreter


def flex_ops(content: bytes) -> list[str]:
    """The Flex (Select TF) ops a .tflite uses, for the error: its operator codes whose custom_code
    starts with "Flex" (what LiteRT itself tests), read through the flatbuffer schema, not a search
    of the bytes (a tensor named "FlexibleHead" is no op). A file the schema cannot read has none."""
    from ai_edge_litert import schema_py_generated as schema

    try:
        model = schema.Model.GetRootAs(content, 0)
        codes = [model.OperatorCodes(i).CustomCode() for i in range(model.OperatorCodesLength())]
    except Exception:  # a damaged flatbuffer: struct.error, IndexError... the caller reports LiteRT's own error
        return []
    return sorted({code.decode() for code in codes if code and code.startswith(b"Flex")})


def tensor_dtypes(interpreter) -> dict[str, int]:
    """How many of the model's tensors hold each dtype (numpy names), and how many are quantized
    (carry scales): what precision the file really has."""
    import numpy as np

    counts: dict[str, int] = {}
    for detail in interpreter.get_tensor_details():
        for key in (np.dtype(detail["dtype"]).name, "quantized" if len(detail["quantization_parameters"]["scales"]) else None):
            if key:
                counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def require_precision(dtypes: dict[str, int], precision: str | None, label: str, step: str) -> None:
    """An fp16 target must hold float16 tensors and an int8 one quantized tensors; an fp32 one
    neither: a file at another precision than its target's would be gated by the wrong thresholds."""
    if precision == "fp16" and not dtypes.get("float16"):
        raise StepError(step, f"{label} holds no float16 tensor (its tensors: {dtypes}): nothing was converted to fp16")
    if precision == "int8" and not dtypes.get("quantized"):
        raise StepError(step, f"{label} holds no quantized tensor (its tensors: {dtypes}): nothing was quantized to int8 (TF's dynamic range quantizes only weight tensors of 1024 elements or more)")
    if precision == "fp32" and (dtypes.get("float16") or dtypes.get("quantized")):
        raise StepError(step, f"{label} holds float16 or quantized tensors ({dtypes}); an fp32 target holds the model unquantized")


def int8_activations(content: bytes) -> int:
    """How many operator outputs in the file are quantized int8 tensors: a full-integer model
    computes in int8; a float or dynamic-range one has none (its int8 tensors are weights)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(content, 0)
    count = 0
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        outputs = {graph.Operators(o).Outputs(j) for o in range(graph.OperatorsLength()) for j in range(graph.Operators(o).OutputsLength())}
        for index in outputs - {-1}:
            tensor = graph.Tensors(index)
            quantization = tensor.Quantization()
            if tensor.Type() == schema.TensorType.INT8 and quantization is not None and quantization.ScaleLength():
                count += 1
    return count


def describe(detail: dict) -> dict:
    """An input's or output's dtype, shape (-1: dynamic) and quantization, as the artifact has them."""
    import numpy as np

    scale, zero_point = detail["quantization"]
    described = {"dtype": np.dtype(detail["dtype"]).name, "shape": [int(d) for d in detail["shape_signature"]]}
    return described | ({"scale": float(scale), "zero_point": int(zero_point)} if scale else {})


def quantize(value, detail: dict):
    """A float input for a tensor that takes int8/uint8: round(x / scale + zero_point), clipped."""
    import numpy as np

    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if dtype.kind in "iu" and value.dtype.kind == "f" and scale:
        info = np.iinfo(dtype)
        return np.clip(np.round(value / scale + zero_point), info.min, info.max).astype(dtype)
    return value.astype(dtype, copy=False)


def dequantize(value, detail: dict):
    """An int8/uint8 output back to float32: (q - zero_point) * scale."""
    import numpy as np

    scale, zero_point = detail["quantization"]
    if value.dtype.kind in "iu" and scale:
        return ((value.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return value
