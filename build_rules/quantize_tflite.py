"""quantize_tflite: float .tflite + kiln calibration -> full-integer (static) int8 .tflite, written by
ai-edge-quantizer's static int8 recipe (weights int8 symmetric per channel, activations int8
asymmetric per tensor, integer kernels) fed with kiln's ranges: no ai-edge-quantizer calibrator
runs. Each activation's range is the one this target's method derives from the shared calibration
(kiln.build_rules.quantize_static.activation_ranges, as the ONNX static target: minmax, percentile
or entropy on the |x| histogram, clipped to the data's [min, max]).

integer_io = true: the signature's float inputs and outputs become int8 themselves (the runner
quantizes and dequantizes with their scale and zero point); false: the recipe leaves the INPUT and
OUTPUT pseudo-ops unquantized, so the file starts with QUANTIZE and ends with DEQUANTIZE and keeps
float32 inputs and outputs. A result with no int8 activation (ai-edge-quantizer supports none of
the model's ops) fails the step: a float model is never published as static int8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from kiln.base.temps import final_name
from kiln.errors import StepError, one_line
from kiln.rules import Params, Rule, RunContext, register


class QuantizeTfliteParams(Params):
    method: Literal["minmax", "percentile", "entropy"] = "percentile"
    percentile: float = 99.999
    integer_io: bool = True


@register
class QuantizeTflite(Rule):
    name = "quantize_tflite"
    version = 1
    tools = ("ai-edge-quantizer", "ai-edge-litert", "numpy")
    Params = QuantizeTfliteParams
    memory_base_mib, memory_per_input = 512, 4.0  # the flatbuffer and the quantizer's copies of it

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: QuantizeTfliteParams, ctx: RunContext) -> dict[str, Any]:
        from kiln.build_rules.calibrate_tflite import float_activations
        from kiln.build_rules.quantize_static import activation_ranges
        from kiln.formats.tflite import SIGNATURE, describe, int8_activations, open_interpreter, require_precision, tensor_dtypes
        from kiln.native.calibration import Calibration

        content = inputs["model"][0].read_bytes()
        activations = float_activations(content, ctx.step)
        calibration = Calibration.from_json(inputs["calibration"][0].read_text())
        missing = [name for name in activations if name not in calibration.observers]
        if missing:
            raise StepError(ctx.step, f"the calibration has no range for tensor {missing[0]!r} ({len(missing)} tensors): it was made for another model")
        ranges = activation_ranges(calibration, list(activations), params)
        flat = sorted(n for n, (lo, hi) in ranges.items() if not max(hi, 0.0) - min(lo, 0.0) > 0.0)
        if flat:  # a scale of ~0 makes LiteRT's integer kernels refuse the whole graph at run time
            raise StepError(ctx.step, f"tensor {flat[0]!r} ({len(flat)} tensors) is 0 on all the calibration data: no int8 range can be derived; calibrate on data that exercises it")
        quantized = _quantize(content, ranges, {name: rank for name, (_index, rank) in activations.items()}, params, ctx.step)
        name = final_name(outputs["model"])  # the step writes a temp file; errors name the file it becomes
        interpreter = open_interpreter(quantized, "the quantized model", name)
        dtypes = tensor_dtypes(interpreter)
        require_precision(dtypes, "int8", "the quantized model", name)
        activations_int8 = int8_activations(quantized)
        if not activations_int8:
            raise StepError(ctx.step, f"static int8 quantized no activation (the file's tensors: {dtypes}): the artifact would not be full integer")
        outputs["model"].write_bytes(quantized)
        runner = interpreter.get_signature_runner(SIGNATURE)
        return {"precision": "int8", "quantization": "static", "quantizer": "ai-edge-quantizer", "method": params.method,
                "integer_io": params.integer_io, "int8_activations": activations_int8, "tensor_dtypes": dtypes,
                "inputs": {n: describe(d) for n, d in sorted(runner.get_input_details().items())},
                "outputs": {n: describe(d) for n, d in sorted(runner.get_output_details().items())},
                "ranges": {n: [float(lo), float(hi)] for n, (lo, hi) in sorted(ranges.items())}}


def static_recipe(integer_io: bool):
    """ai-edge-quantizer's static_wi8_ai8 (int8 channelwise weights, int8 tensorwise activations,
    integer compute); without integer_io the INPUT/OUTPUT pseudo-ops stay float."""
    from ai_edge_quantizer import qtyping, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    manager = recipe_manager.RecipeManager()
    manager.add_static_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, activation_num_bits=8,
                              weight_num_bits=8, algorithm_key=AlgorithmName.MIN_MAX_UNIFORM_QUANT)
    if not integer_io:
        for io in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):
            manager.add_quantization_config(regex=".*", operation_name=io, algorithm_key=AlgorithmName.NO_QUANTIZE)
    return manager.get_quantization_recipe()


def _quantize(content: bytes, ranges: dict[str, tuple[float, float]], ranks: dict[str, int], params: QuantizeTfliteParams, step: str) -> bytes:
    """The quantized flatbuffer, kiln's ranges given as ai-edge-quantizer's calibration result
    ({tensor: {"min", "max"}}, arrays of the tensor's rank with every axis 1, as its own calibrator
    writes them)."""
    import numpy as np
    from ai_edge_quantizer import quantizer

    qsvs = {name: {"min": np.full((1,) * ranks[name], lo, np.float32), "max": np.full((1,) * ranks[name], hi, np.float32)}
            for name, (lo, hi) in ranges.items()}
    try:
        result = quantizer.Quantizer(bytearray(content), static_recipe(params.integer_io)).quantize(qsvs, enable_progress_report=False)
    except Exception as err:  # ai-edge-quantizer raises ValueError/KeyError/RuntimeError for ops and ranges it cannot take
        raise StepError(step, f"static int8 quantization failed: {one_line(err)[:300]}") from None
    return bytes(result.quantized_model)
