"""The per-layer sensitivity scan of options.fallback = "auto": how much each weight layer alone costs
the gates when quantized. For every weight layer (MatMul / Gemm with a 2-D float initializer, as the
quantizers see them; the manifest's exclude_nodes are never quantized and so not scanned) the model is
run on a slice of the validation data with only that layer quantized, and the gate metrics are
measured against the source model's reference outputs, exactly as validation measures them. The
ranking it gives (kiln.runtime.budget.ranked) tells the accuracy-budget search which layers to keep in
higher precision, fewest first.

It runs inside the quantize step, and only when the all-quantized model fails the gates (most targets
pass fully quantized, and then no scan is paid for). Its result is remembered in the workspace state
folder (build/.kiln/scans/<key>.json), keyed by what its numbers depend on (the model, reference and
calibration files, the scan settings, the tools) and not by the gates: a target whose gates alone
changed, or a second target quantizing the same model the same way, reuses it (and one needing it
while another step makes it waits for that one: a flock per memo).

The quantization is simulated where that is exact enough to rank (int8: the weight quantized and
dequantized per output channel as onnxruntime's quantizers do, the activation through
DynamicQuantizeLinear / a calibrated QuantizeLinear, then DequantizeLinear) and real where it is cheap
(int4: the layer becomes the MatMulNBits node the int4 step writes). What of the quantize rules the
scan reuses (static's activation ranges, int4's MatMulNBits node) is handed in as ScanHooks:
kiln.runtime sits below the rules.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from kiln.base.digests import digest
from kiln.base.fsio import read_json, write_json_atomic
from kiln.base.paths import state_dir
from kiln.base.tools import tool_versions
from kiln.errors import StepError
from kiln.rules import Params, RunContext
from kiln.runtime.onnxrt import SharedWeights, session
from kiln.runtime.reference import ReferenceSet, session_runner, worst_over_outputs

# Fixed, so the scan's numbers do not depend on the machine's core count (the ranking is all it feeds):
# one intra-op thread per session, and the cores taken by measuring several layers at once.
THREADS = 1
LAYERS_AT_ONCE = max(1, min(4, os.cpu_count() or 1))
# In every memo key: bump it when the scan's numbers change (this module, or the hooks it is handed:
# quantize_static.activation_ranges, quantize_int4.matmul_nbits), so no memo of the old numbers is read.
# 3: the scan_layers step (versions 1, 2) moved into the quantize steps.
SCAN_FORMAT = 3
TOOLS = ("onnx", "onnxruntime", "numpy")
NOT_NEEDED = "the all-quantized model passes the gates"


class ScanSettings(Params):
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


@dataclass(frozen=True)
class ScanHooks:
    """The quantize rule's own pieces the scan measures with, so a layer quantized alone is quantized
    as the rule quantizes it. ranges(calibration, names, settings) -> {name: (low, high)} (static);
    int4_layer(layer, w, settings) -> (the MatMulNBits node, its initializers) (int4)."""

    ranges: Callable[[Any, list[str], ScanSettings], dict[str, tuple[float, float]]] | None = None
    int4_layer: Callable[[Any, Any, ScanSettings], tuple[Any, list]] | None = None


class LazyScan:
    """The scanned layers, made on the first call (from the memo when one matches, else by scanning
    and writing the memo) and only then: kiln.runtime.budget.search calls it once the all-quantized
    model has failed the gates. facts() says what happened, for the report."""

    def __init__(self, inputs: dict[str, list[Path]], settings: ScanSettings, ctx: RunContext, hooks: ScanHooks):
        self.inputs, self.settings, self.ctx, self.hooks = inputs, settings, ctx, hooks
        self.result: dict[str, Any] | None = None
        self.reused = False
        self.seconds = 0.0

    def __call__(self) -> list[dict]:
        if self.result is None:
            started = time.perf_counter()
            path = memo_path(self.ctx.root, memo_key(self.inputs, self.settings, self.ctx.root))
            with memo_lock(path):  # a step scanning the same now: wait for its memo rather than scan twice
                self.result = read_memo(path)
                self.reused = self.result is not None
                if self.result is None:
                    self.result = scan(self.inputs, self.settings, self.ctx, self.hooks)
                    write_memo(path, self.result)
            self.seconds = round(time.perf_counter() - started, 2)
        return self.result["layers"]

    def facts(self) -> dict[str, Any]:
        """{"ran", "reused" (from the memo), "layers", "samples", "seconds" (spent in this step)}, or
        why it did not run. The ranking itself stays out: the kept layers are in the fallback facts."""
        if self.result is None:
            return {"ran": False, "why": NOT_NEEDED}
        return {"ran": True, "reused": self.reused, "layers": len(self.result["layers"]), "samples": self.result["samples"], "seconds": self.seconds}


def settings_from(fallback: dict[str, Any], step: str) -> ScanSettings:
    """The scan settings of a quantize step's params.fallback: its "scan" table, measured on the
    budget's outputs with its metrics (as validate measures them)."""
    from pydantic import ValidationError

    scan = fallback.get("scan")
    if not isinstance(scan, dict):
        raise StepError(step, f"params.fallback.scan is {scan!r}: expected the scan settings (quantization, max_samples, ...) the plan puts there")
    measured = {"outputs": fallback["outputs"], "metrics": fallback["metrics"], "padding_mask": fallback.get("padding_mask")}
    try:
        return ScanSettings(**scan | measured)
    except ValidationError as err:
        first = err.errors()[0]
        raise StepError(step, f"params.fallback.scan.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


# ---------------------------------------------------------------- the memo


def memo_key(inputs: dict[str, list[Path]], settings: ScanSettings, root: Path) -> str:
    """sha256 of everything the scan's numbers depend on, the gates excepted."""
    calibration = inputs.get("calibration") if settings.quantization == "static" else None
    key = {
        "format": SCAN_FORMAT,
        "model": [digest(root, path) for path in inputs["model"]],
        "reference": digest(root, inputs["reference"][0]),
        "calibration": digest(root, calibration[0]) if calibration else None,
        "settings": settings.model_dump(mode="json"),
        "tools": tool_versions(TOOLS),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def memo_path(root: Path, key: str) -> Path:
    return state_dir(root) / "scans" / f"{key}.json"


@contextlib.contextmanager
def memo_lock(path: Path):
    """An exclusive flock on <memo>.lock for the block: two steps that need the same scan at once
    (two targets differing only in gates, built side by side) make it once. Without a lock file
    (a read-only state folder) the block runs unlocked: at worst the scan is made twice."""
    import fcntl

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by closing, however the block ends
        yield
    finally:
        os.close(fd)


def read_memo(path: Path) -> dict[str, Any] | None:
    """The remembered scan, or None when there is none or it is not one (torn, edited, another
    format): then the scan runs again and rewrites it."""
    memo = read_json(path)
    if not isinstance(memo, dict) or memo.get("format") != SCAN_FORMAT or not isinstance(memo.get("samples"), int):
        return None
    layers = memo.get("layers")
    if not isinstance(layers, list) or not layers:
        return None
    if not all(isinstance(layer, dict) and isinstance(layer.get("node"), str) and isinstance(layer.get("weight"), str)
               and isinstance(layer.get("alone"), dict) for layer in layers):
        return None
    return copy.deepcopy(memo)  # read_json's parse is shared within the process: the caller's own copy


def write_memo(path: Path, result: dict[str, Any]) -> None:
    """Atomically (temp + rename); a memo that cannot be written only costs the next build a scan."""
    with contextlib.suppress(OSError):
        write_json_atomic(path, result, durable=False)


# ---------------------------------------------------------------- the scan


def scan(inputs: dict[str, list[Path]], settings: ScanSettings, ctx: RunContext, hooks: ScanHooks) -> dict[str, Any]:
    """{"format", "quantization", "samples", "layers": [{"node", "weight", "alone": worst metrics}]}
    in graph order. The model is read afresh from its file (the quantize step's copy may be changed,
    static's is shape-inferred): the layers and their names are the file's."""
    from kiln.runtime.onnx_graph import layers_to_quantize, load

    model = load(inputs["model"][0])
    layers = layers_to_quantize(model, settings.exclude_nodes, ctx.step)
    if not layers:
        raise StepError(ctx.step, "no weight layer to scan: the model has no MatMul/Gemm with a 2-D float weight outside options.exclude_nodes")
    if model.ByteSize() >= (1 << 31) - (1 << 24):
        raise StepError(ctx.step, f"options.fallback = \"auto\" scans models under 2 GB only (this one is {model.ByteSize() / 2**30:.1f} GiB): "
                                  "set options.exclude_nodes by hand for it")
    refs = ReferenceSet(inputs["reference"][0], settings.outputs, settings.padding_mask, ctx.step, settings.max_samples)
    ranges = _ranges(inputs, layers, settings, hooks, ctx) if settings.quantization == "static" else {}
    shared = SharedWeights(model)  # one copy of the weights for the N sessions
    alone = _scan(model, layers, settings, ranges, shared, refs, hooks, ctx)
    results = [{"node": layer.node.name, "weight": layer.weight, "alone": worst_over_outputs(metrics)} for layer, metrics in zip(layers, alone)]
    # through JSON, as the memo gives it back: a fresh scan and a reused one rank the very same numbers
    return json.loads(json.dumps({"format": SCAN_FORMAT, "quantization": settings.quantization, "samples": refs.samples, "layers": results}))


def _scan(model, layers, settings: ScanSettings, ranges: dict, shared: SharedWeights, refs: ReferenceSet, hooks: ScanHooks, ctx: RunContext) -> list[dict]:
    """Each layer's metrics alone, in layer order. The variants are made here, one at a time (they
    edit `model` in place), and measured LAYERS_AT_ONCE at a time in threads, each in its own
    one-thread session: the same numbers as one after the other."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    results: list[dict] = []
    with ThreadPoolExecutor(LAYERS_AT_ONCE, thread_name_prefix="kiln-scan") as pool:
        ahead: deque = deque()
        for layer in layers:
            with quantized_alone(model, layer, settings, ranges.get(layer.activation), shared, hooks):
                variant, external = model.SerializeToString(), shared.used_by(model)
            ahead.append(pool.submit(_measure_variant, variant, external, refs, settings, ctx.step))
            while len(ahead) > LAYERS_AT_ONCE:  # at most that many sessions (each a copy of the weights) alive
                results.append(ahead.popleft().result())
                ctx.progress(len(results), len(layers))
        while ahead:
            results.append(ahead.popleft().result())
            ctx.progress(len(results), len(layers))
    return results


def _measure_variant(variant: bytes, external: dict, refs: ReferenceSet, settings: ScanSettings, step: str) -> dict:
    sess = session(variant, threads=THREADS, external=external)
    return refs.metrics(session_runner(sess, settings.outputs, step, concurrent=False), settings.metrics)


def _ranges(inputs: dict[str, list[Path]], layers, settings: ScanSettings, hooks: ScanHooks, ctx: RunContext) -> dict[str, tuple[float, float]]:
    from kiln.native.calibration import Calibration

    if hooks.ranges is None or not inputs.get("calibration"):
        raise StepError(ctx.step, "the static int8 scan needs the calibration (inputs \"calibration\") and quantize_static's activation ranges")
    calibration = Calibration.from_json(inputs["calibration"][0].read_text())
    names = sorted({layer.activation for layer in layers})
    missing = [name for name in names if name not in calibration.observers]
    if missing:
        raise StepError(ctx.step, f"the calibration has no range for {missing[0]!r} ({len(missing)} tensors): it was made for another model")
    return hooks.ranges(calibration, names, settings)


@contextlib.contextmanager
def quantized_alone(model, layer, settings: ScanSettings, activation_range, shared: SharedWeights, hooks: ScanHooks):
    """The model with only `layer` quantized, for the duration of the block; restored after."""
    import onnx

    graph = model.graph
    index = list(graph.node).index(layer.node)
    original = type(layer.node)()
    original.CopyFrom(layer.node)
    if settings.quantization == "int4":
        nodes, inits = _int4_layer(layer, settings, _weight(layer, graph, shared), hooks)
    else:
        nodes, inits = _int8_layer(layer, settings, _weight(layer, graph, shared), activation_range)
    added_inits = [t.name for t in inits]
    opsets = len(model.opset_import)
    if settings.quantization == "int4" and not any(op.domain == "com.microsoft" for op in model.opset_import):
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


def _int8_layer(layer, settings: ScanSettings, w, activation_range):
    """Nodes (the last replaces the layer) and initializers: the activation quantized and
    dequantized, times the weight quantized per output channel (symmetric int8) and dequantized."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from kiln.native import repack, twins

    q, scale, zero_point = repack.quantize_int8(w, symmetric=True, axis=1)
    stem = f"{layer.node.name}.scan"
    inits = [numpy_helper.from_array(repack.dequantize_int8(q, scale, zero_point, axis=1), f"{stem}.w")]
    if settings.quantization == "dynamic":
        nodes = [helper.make_node("DynamicQuantizeLinear", [layer.activation], [f"{stem}.xq", f"{stem}.xs", f"{stem}.xz"], name=f"{stem}.dq")]
    else:
        low, high = activation_range
        signed = settings.activation_type == "int8"
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


def _int4_layer(layer, settings: ScanSettings, w, hooks: ScanHooks):
    """The MatMulNBits node and packed initializers the int4 step writes for this layer."""
    import onnx

    if hooks.int4_layer is None:
        raise ValueError("the int4 scan needs quantize_int4's MatMulNBits writer (ScanHooks.int4_layer)")
    node, inits = hooks.int4_layer(layer, w, settings)
    replaced = onnx.NodeProto()
    replaced.CopyFrom(node)
    return [replaced], inits
