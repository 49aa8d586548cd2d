"""quantize_static: fp32 ONNX + kiln calibration -> int8 QDQ model, written by onnxruntime's
QDQQuantizer fed with kiln's ranges (no onnxruntime calibrator runs).

Weights: per-channel symmetric int8. Activations: the input of every weight layer (MatMul / Gemm
with an initializer B) gets QuantizeLinear/DequantizeLinear with the range this target's method
derives from the calibration histograms; layer outputs stay fp32
(OpTypesToExcludeOutputQuantization), so onnxruntime fuses each into an integer matmul with fp32
output. Nodes named in exclude_nodes stay fp32 (per-layer fallback). A model left with no weight
layer to quantize, or a quantizer that wrote no int8 weight, fails the step: an fp32 model is never
published as int8. options.embeddings and options.fallback = "auto" as for dynamic int8
(build_rules/quantize_dynamic.py): large embedding tables become GatherBlockQuantized, and the
layers the scan found most damaging stay fp32, fewest first, until the gates pass (the scan, run here
only when the all-quantized model fails, quantizes each layer's activation with this rule's ranges:
scan_ranges). The graph is sorted (the quantizer appends nodes out of order) and the written
file passes onnx's full checker. Byte-deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from kiln.errors import StepError, one_line
from kiln.rules import Params, Rule, RunContext, register
from kiln.runtime.budget import fallback_memory_mib, within_budget
from kiln.runtime.scan import ScanHooks
from kiln.runtime.embeddings import embedding_facts, quantize_for_target


class QuantizeStaticParams(Params):
    method: Literal["minmax", "percentile", "entropy", "mse"] = "percentile"
    percentile: float = 99.999
    activation_type: Literal["uint8", "int8"] = "uint8"
    per_channel: bool = True
    op_types: list[str] = ["MatMul", "Gemm"]
    exclude_nodes: list[str] = []
    external_data: bool = False  # the model and the "data" output keep their tensors in one external file
    embeddings: Literal["fp32", "int8", "int4"] = "fp32"  # large Gather tables -> GatherBlockQuantized
    fallback: dict[str, Any] | None = None  # options.fallback = "auto": the gates to reach (kiln.runtime.budget)


@register
class QuantizeStatic(Rule):
    name = "quantize_static"
    # 2: sorted graph, checked by onnx's full checker; quantizing nothing fails
    # 3: embeddings (GatherBlockQuantized) and the accuracy-budget fallback
    # 4: the fallback's per-layer scan runs here (was the scan_layers step), only when the all-quantized model fails
    version = 4
    tools = ("onnx", "onnxruntime", "numpy")
    Params = QuantizeStaticParams
    cost = 10  # with fallback = "auto": a scan and a search

    @classmethod
    def memory_mib(cls, params: dict[str, Any], input_bytes: int) -> int:
        return super().memory_mib(params, input_bytes) + fallback_memory_mib(params)

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: QuantizeStaticParams, ctx: RunContext) -> dict[str, Any]:
        import logging

        from onnxruntime.quantization.quant_utils import save_and_reload_model_with_shape_infer

        from kiln.native.calibration import Calibration
        from kiln.runtime.onnx_graph import ACTIVATION_QUANTIZERS, count_ops, layers_to_quantize, load, publish

        logging.getLogger("onnxruntime").setLevel(logging.WARNING)
        # The quantizer reads activation dtypes from value_info. Shape inference runs in a temporary
        # folder: onnxruntime's path variant writes model-inferred.onnx beside the input, in another
        # step's folder, where two static targets of one model would race on it.
        model = save_and_reload_model_with_shape_infer(load(inputs["model"][0]))
        layers = layers_to_quantize(model, params.exclude_nodes, ctx.step, params.op_types)
        if not layers:
            raise StepError(ctx.step, nothing_to_quantize(model, params))
        calibration = Calibration.from_json(inputs["calibration"][0].read_text())
        activations = sorted({layer.activation for layer in layers})
        missing = [name for name in activations if name not in calibration.observers]
        if missing:
            raise StepError(ctx.step, f"the calibration has no range for {missing[0]!r} ({len(missing)} tensors): it was made for another model")
        ranges = activation_ranges(calibration, activations, params)
        notes: dict[str, Any] = {}

        def quantize(kept: list[str]):
            return _quantize_kept(model, ranges, [layer for layer in layers if layer.node.name not in kept], params, ctx, notes)

        quantized, facts = within_budget(quantize, inputs, params.fallback, ctx, max_kept=len(layers) - 1, hooks=ScanHooks(ranges=scan_ranges))
        if not int8_weights(quantized):
            raise StepError(ctx.step, f"static int8 wrote no int8 weight for the {len(layers)} weight layers it was given: the artifact would be fp32")
        publish(quantized, outputs["model"], ctx.step, outputs["data"] if params.external_data else None)
        return {"quantized_layers": len(layers), "excluded": len(params.exclude_nodes), "method": params.method,
                "quantized_ops": count_ops(quantized.graph, ACTIVATION_QUANTIZERS),
                "ranges": {name: [float(lo), float(hi)] for name, (lo, hi) in sorted(ranges.items())}} | embedding_facts(notes, quantized) | facts


def _quantize_kept(model, ranges: dict, layers, params: QuantizeStaticParams, ctx: RunContext, notes: dict[str, Any]):
    """A copy of `model` with `layers` quantized (the quantizer rewrites the proto it is given), then
    the embeddings as the target asks."""
    import onnx


    from onnxruntime.quantization.quant_utils import add_dequant_output_suffix

    from kiln.runtime.onnx_graph import weight_layers

    source = onnx.ModelProto()
    source.CopyFrom(model)
    used = {layer.activation for layer in layers}
    names = {layer.node.name for layer in layers}
    floats = {layer.node.name: layer.activation for layer in weight_layers(model, params.op_types) if layer.node.name not in names}
    quantized = _quantize(source, {k: v for k, v in ranges.items() if k in used}, sorted(names), params, ctx)
    # onnxruntime points EVERY reader of a quantized activation at its dequantized copy: a layer kept
    # in fp32 that shares its input with a quantized one (BERT's Q, K, V) would still see int8 values.
    for node in quantized.graph.node:
        activation = floats.get(node.name)
        if activation is not None and node.input and node.input[0] == add_dequant_output_suffix(activation):
            node.input[0] = activation
    quantize_for_target(quantized, params.embeddings, notes)
    return quantized


def nothing_to_quantize(model, params: QuantizeStaticParams) -> str:
    """Why there is no layer for static int8: what the graph has, and what to set."""
    from kiln.runtime.onnx_graph import describe_census, weight_layers, weight_op_census

    census = weight_op_census(model.graph)
    if weight_layers(model, params.op_types):
        hint = f"options.exclude_nodes ({len(params.exclude_nodes)} nodes) leaves none of them"
    else:
        hint = ("static int8 quantizes top-level MatMul/Gemm layers with a 2-D weight only; "
                "quantization = \"dynamic\" with options.op_types reaches Conv, LSTM, Attention and If/Loop/Scan bodies")
    return f"static int8 has no weight layer to quantize with op_types {params.op_types}; the graph's ops with weights: {describe_census(census)}: {hint}"


def int8_weights(model) -> int:
    """How many DequantizeLinear nodes read an int8 initializer: the weights the quantizer wrote."""
    import onnx

    int8 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    return sum(1 for node in model.graph.node if node.op_type == "DequantizeLinear" and node.input[0] in int8)


def activation_ranges(calibration, names: list[str], params: QuantizeStaticParams) -> dict[str, tuple[float, float]]:
    """(low, high) per tensor: the data's [min, max] clipped to [-T, T], T the method's symmetric
    threshold on |x| (minmax: max |x|, so the data's extremes themselves). A one-signed tensor (after
    GELU, Softmax) thus keeps its zero-point at the edge rather than wasting half the levels."""
    options = {"p": params.percentile} if params.method == "percentile" else {}
    ranges = {}
    for name in names:
        obs = calibration[name]
        if params.method == "mse":  # the step over [-T, T] in mse_threshold's terms: 2T / levels
            one_signed = params.activation_type == "uint8" and (obs.min >= 0 or obs.max <= 0)
            options = {"levels": 510 if one_signed else 254 if params.activation_type == "int8" else 255}
        t = obs.threshold(params.method, **options)
        ranges[name] = (max(obs.min, -t), min(obs.max, t))
    return ranges


def scan_ranges(calibration, names: list[str], settings) -> dict[str, tuple[float, float]]:
    """activation_ranges with the scan's settings (kiln.runtime.scan.ScanSettings: method, percentile,
    activation_type): the ranges the scan quantizes each layer's activation with are this rule's."""
    return activation_ranges(calibration, names, QuantizeStaticParams(method=settings.method, percentile=settings.percentile,
                                                                      activation_type=settings.activation_type))


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
