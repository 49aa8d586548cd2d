"""quantize_static: fp32 ONNX + kiln calibration -> int8 QDQ model, written by onnxruntime's
QDQQuantizer fed with kiln's ranges (no onnxruntime calibrator runs).

Weights: per-channel symmetric int8. Activations: the input of every weight layer (MatMul / Gemm
with an initializer B) gets QuantizeLinear/DequantizeLinear with the range this target's method
derives from the calibration histograms; layer outputs stay fp32
(OpTypesToExcludeOutputQuantization), so onnxruntime fuses each into an integer matmul with fp32
output. Nodes named in exclude_nodes stay fp32 (per-layer fallback). Byte-deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from kiln.errors import StepError, one_line
from kiln.rules import Params, Rule, RunContext, register


class QuantizeStaticParams(Params):
    method: Literal["minmax", "percentile", "entropy"] = "percentile"
    percentile: float = 99.999
    activation_type: Literal["uint8", "int8"] = "uint8"
    per_channel: bool = True
    op_types: list[str] = ["MatMul", "Gemm"]
    exclude_nodes: list[str] = []


@register
class QuantizeStatic(Rule):
    name = "quantize_static"
    version = 1
    tools = ("onnx", "onnxruntime", "numpy")
    Params = QuantizeStaticParams

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: QuantizeStaticParams, ctx: RunContext) -> dict[str, Any]:
        import logging

        import onnx
        from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

        from kiln.native.calibration import Calibration
        from kiln.runtime.onnx_graph import layers_to_quantize

        logging.getLogger("onnxruntime").setLevel(logging.WARNING)
        model = load_model_with_shape_infer(inputs["model"][0])  # the quantizer reads activation dtypes from value_info
        layers = layers_to_quantize(model, params.exclude_nodes, ctx.step, params.op_types)
        calibration = Calibration.from_json(inputs["calibration"][0].read_text())
        activations = sorted({layer.activation for layer in layers})
        missing = [name for name in activations if name not in calibration.observers]
        if missing:
            raise StepError(ctx.step, f"the calibration has no range for {missing[0]!r} ({len(missing)} tensors): it was made for another model")
        ranges = activation_ranges(calibration, activations, params)
        quantized = _quantize(model, ranges, [layer.node.name for layer in layers], params, ctx)
        onnx.save(quantized, str(outputs["model"]))
        return {"quantized_layers": len(layers), "excluded": len(params.exclude_nodes), "method": params.method,
                "ranges": {name: [float(lo), float(hi)] for name, (lo, hi) in sorted(ranges.items())}}


def activation_ranges(calibration, names: list[str], params: QuantizeStaticParams) -> dict[str, tuple[float, float]]:
    """(low, high) per tensor: the data's [min, max] clipped to [-T, T], T the method's symmetric
    threshold on |x| (minmax: max |x|, so the data's extremes themselves). A one-signed tensor (after
    GELU, Softmax) thus keeps its zero-point at the edge rather than wasting half the levels."""
    options = {"p": params.percentile} if params.method == "percentile" else {}
    ranges = {}
    for name in names:
        obs = calibration[name]
        t = obs.threshold(params.method, **options)
        ranges[name] = (max(obs.min, -t), min(obs.max, t))
    return ranges


def _quantize(model, ranges: dict, layer_names: list[str], params: QuantizeStaticParams, ctx: RunContext):
    import numpy as np
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    activation = QuantType.QUInt8 if params.activation_type == "uint8" else QuantType.QInt8
    tensors = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in ranges.items()})
    others = [n.name for n in model.graph.node if n.op_type in params.op_types and n.name not in layer_names]
    try:
        quantizer = QDQQuantizer(
            model, per_channel=params.per_channel, reduce_range=False, weight_qType=QuantType.QInt8,
            activation_qType=activation, tensors_range=tensors, nodes_to_quantize=[], nodes_to_exclude=others,
            op_types_to_quantize=params.op_types,
            extra_options={"ActivationSymmetric": params.activation_type == "int8", "WeightSymmetric": True,
                           "OpTypesToExcludeOutputQuantization": params.op_types},
        )
        quantizer.quantize_model()
    except Exception as err:  # onnxruntime.quantization raises assorted plain exceptions
        raise StepError(ctx.step, f"static int8 quantization failed: {one_line(err)}") from None
    return quantizer.model.model
