"""smooth_onnx: fp32 ONNX -> the same function with its activation outliers moved into the weights
(SmoothQuant, Xiao et al. 2023), so that int8 quantization that follows loses less.

int8 activations get one scale per tensor, set by its largest |x|; transformer activations carry a
few channels ~100x larger than the rest, so those few set the scale and every other channel is left
with a handful of int8 levels. Weights are quantized per output channel and are easy to quantize.
Smoothing divides each input channel j of a weight layer's activation by s_j and multiplies row j of
the weight by s_j: y = (x / s) @ (s * W) = x @ W, exactly in real arithmetic. With
s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) the activation's channels come out far more even, and
the weights, scaled row-wise, stay cheap to quantize per output channel.

The layers reading one activation (e.g. Q, K and V projections) share one s: one Mul(activation, 1/s)
node feeds them all, while the activation's other readers (a residual Add) keep the original tensor.
The channel maxima come from the calibrate step's channels.json (max |x| per channel over the
calibration data). A group is skipped, and listed with the reason, when its weight is also read
outside the group (scaling it would change the other reader), when the calibration has no maxima
for its activation or they have another length. Maxima missing for every group fail the step: the
calibration was made for another model. The written file is sorted and passes onnx's full checker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from kiln.errors import StepError
from kiln.rules import Params, Rule, RunContext, register

# s is clipped to this range: a near-zero weight row or activation channel must not blow the other
# side up (float32 keeps ~7 digits; a factor of 1e4 either way leaves the function intact).
SCALE_MIN, SCALE_MAX = 1e-4, 1e4


class SmoothOnnxParams(Params):
    alpha: float = Field(0.5, gt=0.0, le=1.0)  # how much of the activation's range moves into the weights
    op_types: list[Literal["MatMul", "Gemm"]] = ["MatMul", "Gemm"]
    external_data: bool = False  # the model and the "data" output keep their tensors in one external file


@register
class SmoothOnnx(Rule):
    name = "smooth_onnx"
    version = 1
    tools = ("onnx", "numpy")
    Params = SmoothOnnxParams

    def run(self, inputs: dict[str, list[Path]], outputs: dict[str, Path], params: SmoothOnnxParams, ctx: RunContext) -> dict[str, Any]:
        from kiln.runtime.onnx_graph import load, publish, weight_layers

        model = load(inputs["model"][0])
        channels_file = inputs["channels"][0]
        channels = read_channels(channels_file, ctx.step)
        groups = group_by_activation(weight_layers(model, params.op_types))
        if not groups:
            raise StepError(ctx.step, f"the model has no {'/'.join(params.op_types)} node with a 2-D float weight initializer: nothing to smooth")
        weights = {t.name: t for t in model.graph.initializer}
        mismatched = {a: reason for a, layers in groups.items() if (reason := channel_mismatch(a, layers, weights, channels))}
        if len(mismatched) == len(groups):
            first = min(mismatched)
            raise StepError(ctx.step, f"{channels_file.name}: the calibration has no channel maxima for the {len(groups)} activations the model's weight layers read (first {first!r}: {mismatched[first]}): it was made for another model")
        skipped = mismatched | shared_weight_reasons(model, groups)  # a shared weight's reason wins
        scales = {}
        for activation, layers in groups.items():
            if activation not in skipped:
                scales[activation] = smooth_group(activation, layers, weights, channels[activation], params.alpha)
        insert_divisions(model, groups, scales)
        publish(model, outputs["model"], ctx.step, outputs["data"] if params.external_data else None)
        return {
            "alpha": params.alpha,
            "smoothed": len(scales),
            "layers": sum(len(groups[a]) for a in scales),
            "skipped": dict(sorted(skipped.items())),
            "scale_range": [float(min(s.min() for s in scales.values())), float(max(s.max() for s in scales.values()))] if scales else None,
        }


def read_channels(path: Path, step: str) -> dict[str, list[float]]:
    """channels.json (the calibrate step's): {tensor: [max |x| per channel]}."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StepError(step, f"{path.name}: cannot read the per-channel maxima: {err}") from None
    if not isinstance(data, dict):
        raise StepError(step, f"{path.name}: expected {{tensor name: [max |x| per channel]}}, got a JSON {type(data).__name__}")
    for name, maxima in data.items():
        if not isinstance(maxima, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in maxima):
            raise StepError(step, f"{path.name}: tensor {name!r}: expected a list of numbers (max |x| per channel), got {str(maxima)[:80]}")
    return data


def group_by_activation(layers) -> dict[str, list]:
    """activation -> its weight layers, in graph order (the dict too: first reader first)."""
    groups: dict[str, list] = {}
    for layer in layers:
        groups.setdefault(layer.activation, []).append(layer)
    return groups


def shared_weight_reasons(model, groups: dict[str, list]) -> dict[str, str]:
    """activation -> why its group cannot be smoothed: a weight of it is read by a node outside the
    group (another group's layer included: scaling it for both would be wrong), is a graph input or
    output, or is read both as [K, N] and as [N, K] (a Gemm with transB beside a MatMul)."""
    from kiln.runtime.onnx_graph import outer_reads, subgraphs

    # By identity: protobuf returns the same object for a node while a reference to it lives (the layers hold one).
    group_nodes = {id(layer.node): activation for activation, layers in groups.items() for layer in layers}
    readers: dict[str, list] = {}  # weight -> the nodes that read it, as (node, input index or None: from a subgraph)
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, index))
        for name in set().union(*(outer_reads(sub) for sub in subgraphs(node))):
            readers.setdefault(name, []).append((node, None))
    boundary = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    reasons = {}
    for activation, layers in groups.items():
        for layer in layers:
            reason = _foreign_reader(layer.weight, activation, readers, group_nodes, boundary, groups)
            if reason:
                reasons[activation] = reason
                break
    return reasons


def _foreign_reader(weight: str, activation: str, readers, group_nodes, boundary, groups) -> str | None:
    if weight in boundary:
        return f"its weight {weight!r} is also a graph input or output"
    orientations = {layer.transposed for layer in groups[activation] if layer.weight == weight}
    if len(orientations) > 1:
        return f"its weight {weight!r} is read both as [K, N] and transposed"
    for node, index in readers.get(weight, []):
        owner = group_nodes.get(id(node)) if index == 1 else None
        if owner == activation:
            continue
        where = f"the weight layer of activation {owner!r}" if owner else f"{node.op_type} node {node.name or '(unnamed)'!r}"
        return f"its weight {weight!r} is shared with {where}"
    return None


def _input_channels(layer, weights) -> int:
    dims = weights[layer.weight].dims
    return int(dims[1] if layer.transposed else dims[0])


def channel_mismatch(activation: str, layers, weights, channels: dict) -> str | None:
    """Why the calibration's maxima cannot smooth this group, or None."""
    if activation not in channels:
        return "not in the calibration"
    k = _input_channels(layers[0], weights)
    found = len(channels[activation])
    if found != k:
        return f"the calibration has {found} channel maxima, the weight layers {k} input channels"
    return None


def smooth_group(activation: str, layers, weights, maxima: list[float], alpha: float):
    """Scale the rows (input channels) of each of the group's weights by s, in place, and return s
    (float32 [K]). Each weight is scaled once however many of the group's layers read it."""
    import numpy as np
    from onnx import numpy_helper

    a = np.asarray(maxima, np.float64)
    arrays = {layer.weight: (numpy_helper.to_array(weights[layer.weight]), layer.transposed) for layer in layers}
    w = np.max([np.abs(arr).max(axis=0 if transposed else 1) for arr, transposed in arrays.values()], axis=0).astype(np.float64)
    usable = np.isfinite(a) & np.isfinite(w) & (a > 0) & (w > 0)
    s = np.ones_like(a)
    with np.errstate(over="ignore", divide="ignore"):
        s[usable] = a[usable] ** alpha / w[usable] ** (1.0 - alpha)
    s = np.clip(np.nan_to_num(s, nan=1.0, posinf=SCALE_MAX), SCALE_MIN, SCALE_MAX).astype(np.float32)
    for name, (arr, transposed) in arrays.items():
        scaled = arr * (s[None, :] if transposed else s[:, None])  # W[N, K] scales columns, W[K, N] rows
        weights[name].CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), name))
    return s


def insert_divisions(model, groups: dict[str, list], scales: dict) -> None:
    """For each smoothed activation, one Mul(activation, 1/s) node right after the activation's
    producer (first, for a graph input) feeding only the group's layers."""
    import numpy as np
    from onnx import helper, numpy_helper

    taken = {name for node in model.graph.node for name in (*node.input, *node.output, node.name)}
    taken |= {t.name for t in model.graph.initializer} | {v.name for v in model.graph.input}
    muls: dict[str, list] = {}  # producer's output (the activation) -> its Mul
    for activation, s in scales.items():
        inverse, smoothed, node_name = (_unique(f"{activation}{suffix}", taken) for suffix in ("_smooth_inverse", "_smoothed", "_smooth"))
        model.graph.initializer.append(numpy_helper.from_array((np.float32(1) / s).astype(np.float32), inverse))
        muls[activation] = [helper.make_node("Mul", [activation, inverse], [smoothed], name=node_name)]
        for layer in groups[activation]:
            layer.node.input[0] = smoothed
    produced = {name for node in model.graph.node for name in node.output}
    nodes = [mul for activation in muls if activation not in produced for mul in muls[activation]]
    for node in model.graph.node:
        nodes.append(node)
        nodes.extend(mul for output in node.output if output in muls for mul in muls[output])
    copies = [type(node).FromString(node.SerializeToString()) for node in nodes]  # the field is cleared next
    del model.graph.node[:]
    model.graph.node.extend(copies)


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate
