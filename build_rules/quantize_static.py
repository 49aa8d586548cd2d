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

        from kiln.quant.calibration import Calibration
        from kiln.quant.graph import check_node_names, name_unnamed_nodes, weight_layers

        logging.getLogger("onnxruntime").setLevel(logging.WARNING)
        model = load_model_with_shape_infer(inputs["model"][0])  # the quantizer reads activation dtypes from value_info
        name_unnamed_nodes(model)
        problem = check_node_names(model, params.exclude_nodes)
        if problem:
            raise StepError(ctx.step, problem)
        calibration = Calibration.from_json(inputs["calibration"][0].read_text())
        layers = [layer for layer in weight_layers(model, params.op_types) if layer.node.name not in params.exclude_nodes]
        missing = sorted({layer.activation for layer in layers} - set(calibration.observers))
        if missing:
            raise StepError(ctx.step, f"the calibration has no range for {missing[0]!r} ({len(missing)} tensors): it was made for another model")
        ranges = activation_ranges(calibration, sorted({layer.activation for layer in layers}), params)
        quantized = _quantize(model, ranges, [layer.node.name for layer in layers], params, ctx)
        onnx.save(quantized, str(outputs["model"]))
        return {"quantized_layers": len(layers), "excluded": len(params.exclude_nodes), "method": params.method,
                "ranges": {name: [float(lo), float(hi)] for name, (lo, hi) in sorted(ranges.items())}}


def activation_ranges(calibration, names: list[str], params: QuantizeStaticParams) -> dict[str, tuple[float, float]]:
    """(low, high) per tensor. minmax: the data's extremes. percentile / entropy give a symmetric
    threshold T on |x|; the range is the data's [min, max] clipped to [-T, T], so a one-signed tensor
    (after GELU, Softmax) keeps its zero-point at the edge rather than wasting half the levels."""
    ranges = {}
    for name in names:
        obs = calibration[name]
        if params.method == "minmax":
            ranges[name] = (obs.min, obs.max)
            continue
        t = obs.percentile(params.percentile) if params.method == "percentile" else obs.entropy()
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
