"""scan_layers: how much each weight layer alone costs the gates when quantized. For every weight
layer (MatMul / Gemm with a 2-D float initializer, as the quantizers see them; the manifest's
exclude_nodes are never quantized and so not scanned) the model is run on a slice of the validation
data with only that layer quantized, and the gate metrics are measured against the source model's
reference outputs, exactly as validation measures them. The result, sensitivity.json, ranks the
layers for options.fallback = "auto": the quantize step keeps the most damaging ones in higher
precision, fewest first, re-measuring the real quantized model each time (effects do not add up).

One step per model, data and quantization method: every target quantizing that model the same way
shares it, whatever its gates. The quantization is simulated where that is exact enough to rank
(int8: the weight quantized and dequantized per output channel as onnxruntime's quantizers do, the
activation through DynamicQuantizeLinear / a calibrated QuantizeLinear, then DequantizeLinear) and
real where it is cheap (int4: the layer becomes the MatMulNBits node the int4 step writes).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Literal

from kiln.errors import StepError
from kiln.rules import Params, Rule, RunContext, register
from kiln.runtime.onnxrt import SharedWeights, session
from kiln.runtime.reference import ReferenceSet, session_runner, worst_over_outputs

# Fixed, so the scan's numbers do not depend on the machine's core count (the ranking is all it feeds):
# one intra-op thread per session, and the cores taken by measuring several layers at once.
THREADS = 1
LAYERS_AT_ONCE = max(1, min(4, os.cpu_count() or 1))


class ScanLayersParams(Params):
    quantization: Literal["dynamic", "static", "int4"]
    outputs: list[str]
    metrics: list[str]
    padding_mask: str | None = None
    max_samples: int = 64  # the validation slice each of the N runs sees: the scan is N model runs
    exclude_nodes: list[str] = []
    # static: how calibrated ranges are derived (as quantize_static)
    method: Literal["minmax", "percentile", "entropy", "mse"] = "percentile"
    percentile: float = 99.999
    activation_type: Literal["uint8", "int8"] = "uint8"
    # int4: the MatMulNBits the int4 step writes
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4


@register
class ScanLayers(Rule):
    name = "scan_layers"
    version = 2  # 2: one-thread sessions (were two), several layers at once: the same numbers on bert, not promised everywhere
    tools = ("onnx", "onnxruntime", "numpy")
    Params = ScanLayersParams
    memory_base_mib = 1024

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: ScanLayersParams, ctx: RunContext) -> dict[str, Any]:
        import json

        from kiln.runtime.onnx_graph import layers_to_quantize, load

        model = load(inputs["model"][0])
        layers = layers_to_quantize(model, params.exclude_nodes, ctx.step)
        if not layers:
            raise StepError(ctx.step, "no weight layer to scan: the model has no MatMul/Gemm with a 2-D float weight outside options.exclude_nodes")
        if model.ByteSize() >= (1 << 31) - (1 << 24):
            raise StepError(ctx.step, f"options.fallback = \"auto\" scans models under 2 GB only (this one is {model.ByteSize() / 2**30:.1f} GiB): "
                                      "set options.exclude_nodes by hand for it")
        refs = ReferenceSet(inputs["reference"][0], params.outputs, params.padding_mask, ctx.step, params.max_samples)
        ranges = _ranges(inputs, layers, params, ctx) if params.quantization == "static" else {}
        started = time.perf_counter()
        shared = SharedWeights(model)  # one copy of the weights for the N sessions
        alone = _scan(model, layers, params, ranges, shared, refs, ctx)
        results = [{"node": layer.node.name, "weight": layer.weight, "alone": worst_over_outputs(metrics)} for layer, metrics in zip(layers, alone)]
        seconds = round(time.perf_counter() - started, 2)
        # no timing in the file: its bytes are part of every downstream key and of the provenance
        report = {"quantization": params.quantization, "samples": refs.samples, "layers": results}
        outputs["sensitivity"].write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        return {"layers": len(results), "samples": refs.samples, "seconds": seconds,
                "most_sensitive": min(results, key=lambda r: r["alone"].get("min_cosine", 1.0))["node"]}


def _scan(model, layers, params: ScanLayersParams, ranges: dict, shared: SharedWeights, refs: ReferenceSet, ctx: RunContext) -> list[dict]:
    """Each layer's metrics alone, in layer order. The variants are made here, one at a time (they
    edit `model` in place), and measured LAYERS_AT_ONCE at a time in threads, each in its own
    one-thread session: the same numbers as one after the other."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    results: list[dict] = []
    with ThreadPoolExecutor(LAYERS_AT_ONCE, thread_name_prefix="kiln-scan") as pool:
        ahead: deque = deque()
        for layer in layers:
            with _quantized_alone(model, layer, params, ranges.get(layer.activation), shared):
                variant, external = model.SerializeToString(), shared.used_by(model)
            ahead.append(pool.submit(_measure_variant, variant, external, refs, params, ctx.step))
            while len(ahead) > LAYERS_AT_ONCE:  # at most that many sessions (each a copy of the weights) alive
                results.append(ahead.popleft().result())
                ctx.progress(len(results), len(layers))
        while ahead:
            results.append(ahead.popleft().result())
            ctx.progress(len(results), len(layers))
    return results


def _measure_variant(variant: bytes, external: dict, refs: ReferenceSet, params: ScanLayersParams, step: str) -> dict:
    sess = session(variant, threads=THREADS, external=external)
    return refs.metrics(session_runner(sess, params.outputs, step, concurrent=False), params.metrics)


def _ranges(inputs: dict[str, list[Path]], layers, params: ScanLayersParams, ctx: RunContext) -> dict[str, tuple[float, float]]:
    from kiln.build_rules.quantize_static import QuantizeStaticParams, activation_ranges
    from kiln.native.calibration import Calibration

    calibration = Calibration.from_json(inputs["calibration"][0].read_text())
    names = sorted({layer.activation for layer in layers})
    missing = [name for name in names if name not in calibration.observers]
    if missing:
        raise StepError(ctx.step, f"the calibration has no range for {missing[0]!r} ({len(missing)} tensors): it was made for another model")
    return activation_ranges(calibration, names, QuantizeStaticParams(method=params.method, percentile=params.percentile, activation_type=params.activation_type))


@contextlib.contextmanager
def _quantized_alone(model, layer, params: ScanLayersParams, activation_range, shared: SharedWeights):
    """The model with only `layer` quantized, for the duration of the block; restored after."""
    import onnx

    graph = model.graph
    index = list(graph.node).index(layer.node)
    original = type(layer.node)()
    original.CopyFrom(layer.node)
    if params.quantization == "int4":
        nodes, inits = _int4_layer(layer, params, _weight(layer, graph, shared))
    else:
        nodes, inits = _int8_layer(layer, params, _weight(layer, graph, shared), activation_range)
    added_inits = [t.name for t in inits]
    opsets = len(model.opset_import)
    if params.quantization == "int4" and not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    graph.initializer.extend(inits)
    for offset, node in enumerate(nodes[:-1]):
        graph.node.insert(index + offset, node)
    graph.node[index + len(nodes) - 1].CopyFrom(nodes[-1])
    try:
        yield
    finally:
        for _ in nodes[:-1]:
            del graph.node[index]
        graph.node[index].CopyFrom(original)
        kept = [t for t in graph.initializer if t.name not in added_inits]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        del model.opset_import[opsets:]


def _weight(layer, graph, shared: SharedWeights):
    """The layer's weight as W[K, N] (from the shared arrays, where it moved)."""
    from kiln.runtime.onnx_graph import weight_kn

    array = shared.arrays.get(layer.weight)
    return weight_kn(next(t for t in graph.initializer if t.name == layer.weight) if array is None else array, layer.transposed)


def _int8_layer(layer, params: ScanLayersParams, w, activation_range):
    """Nodes (the last replaces the layer) and initializers: the activation quantized and
    dequantized, times the weight quantized per output channel (symmetric int8) and dequantized."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from kiln.native import repack, twins

    q, scale, zero_point = repack.quantize_int8(w, symmetric=True, axis=1)
    stem = f"{layer.node.name}.scan"
    inits = [numpy_helper.from_array(repack.dequantize_int8(q, scale, zero_point, axis=1), f"{stem}.w")]
    if params.quantization == "dynamic":
        nodes = [helper.make_node("DynamicQuantizeLinear", [layer.activation], [f"{stem}.xq", f"{stem}.xs", f"{stem}.xz"], name=f"{stem}.dq")]
    else:
        low, high = activation_range
        signed = params.activation_type == "int8"
        qmin, qmax = (-127, 127) if signed else (0, 255)
        s, z = twins.int8_params(np.float32(low), np.float32(high), signed, qmin, qmax)
        zdtype = np.int8 if signed else np.uint8
        inits += [numpy_helper.from_array(np.asarray(s, np.float32), f"{stem}.xs"), numpy_helper.from_array(np.asarray(z, zdtype), f"{stem}.xz")]
        nodes = [helper.make_node("QuantizeLinear", [layer.activation, f"{stem}.xs", f"{stem}.xz"], [f"{stem}.xq"], name=f"{stem}.q")]
    nodes.append(helper.make_node("DequantizeLinear", [f"{stem}.xq", f"{stem}.xs", f"{stem}.xz"], [f"{stem}.x"], name=f"{stem}.dql"))
    replaced = onnx.NodeProto()
    replaced.CopyFrom(layer.node)
    replaced.input[0] = f"{stem}.x"
    replaced.input[1] = f"{stem}.w"
    if layer.node.op_type == "Gemm":
        for attr in replaced.attribute:
            if attr.name == "transB":
                attr.i = 0  # the simulated weight is stored [K, N]
    nodes.append(replaced)
    return nodes, inits


def _int4_layer(layer, params: ScanLayersParams, w):
    """The MatMulNBits node and packed initializers the int4 step writes for this layer."""
    import onnx

    from kiln.build_rules.quantize_int4 import QuantizeInt4Params, matmul_nbits

    int4 = QuantizeInt4Params(block_size=params.block_size, symmetric=params.symmetric, accuracy_level=params.accuracy_level)
    node, inits = matmul_nbits(layer, w, int4, bits=4)
    replaced = onnx.NodeProto()
    replaced.CopyFrom(node)
    return [replaced], inits
