"""ONNX graph facts the rules share.

Which nodes quantization touches: MatMul / Gemm whose B is a 2-D float weight. Calibration observes
their activation inputs, static int8 puts Q/DQ around them, int4 rewrites them to MatMulNBits.
Attention-score MatMuls (both inputs computed) are not weight layers and stay fp32 in every scheme
here. Which weight ops a graph holds, subgraphs included, and which quantized ops a rule wrote: how a
quantizing rule proves it quantized something. And publishing: every ONNX a rule writes is
topologically sorted (subgraphs too) and passes onnx's full checker, which onnxruntime does not need
but other consumers (polygraphy, TensorRT's parser, onnx tools) do.
"""

from __future__ import annotations

import heapq
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx

from kiln.base.temps import final_name
from kiln.errors import StepError, one_line

FLOAT = onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class WeightLayer:
    node: onnx.NodeProto
    activation: str  # the computed input A
    weight: str  # the initializer B
    transposed: bool  # Gemm transB = 1: B is [N, K]
    bias: str | None  # Gemm C, when it is a 1-D initializer


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def weight_layers(model: onnx.ModelProto, op_types=("MatMul", "Gemm")) -> list[WeightLayer]:
    """Nodes computing A @ W (+ bias) with W a 2-D float32 initializer, in graph order. A Gemm with
    transA, alpha != 1, beta != 1 or a bias that is not a 1-D initializer is not such a layer."""
    inits = {t.name: t for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type not in op_types or len(node.input) < 2:
            continue
        a, b = node.input[0], node.input[1]
        w = inits.get(b)
        if a in inits or w is None or w.data_type != FLOAT or len(w.dims) != 2:
            continue
        bias = None
        if node.op_type == "Gemm":
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
                continue
            if len(node.input) > 2 and node.input[2]:
                c = inits.get(node.input[2])
                if c is None or c.data_type != FLOAT or len(c.dims) != 1:
                    continue
                bias = c.name
        layers.append(WeightLayer(node, a, b, bool(_attr(node, "transB", 0)) if node.op_type == "Gemm" else False, bias))
    return layers


def weight_kn(tensor, transposed: bool):
    """A weight layer's initializer (a TensorProto, or its array) as a C-contiguous W[K, N] (a Gemm
    with transB stores it [N, K]), the orientation MatMulNBits and per-output-channel quantization read."""
    import numpy as np
    from onnx import numpy_helper

    w = tensor if isinstance(tensor, np.ndarray) else numpy_helper.to_array(tensor)
    return np.ascontiguousarray(w.T if transposed else w)


def layers_to_quantize(model: onnx.ModelProto, exclude: list[str], step: str, op_types=("MatMul", "Gemm")) -> list[WeightLayer]:
    """The weight layers a quantizer rewrites: every one but the nodes named in exclude_nodes.
    Nameless nodes are named <op_type>_<index> first (quantizers address nodes by name; "" would match
    them all). An excluded name that is no node of the graph fails the step, listing what can be."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    layers = weight_layers(model, op_types)
    known = {node.name for node in model.graph.node}
    unknown = [name for name in exclude if name not in known]
    if unknown:
        names = [layer.node.name for layer in weight_layers(model)]
        shown = ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")
        raise StepError(step, f"options.exclude_nodes: {unknown[0]!r} is not a node of the model; weight layers it can exclude: {shown}")
    return [layer for layer in layers if layer.node.name not in exclude]


def with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    """The model (changed in place) with float tensors `names` added as graph outputs, serialized for
    an onnxruntime session: how calibration reads activations without keeping a second model around."""
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, FLOAT, None) for n in names if n not in present)
    return model.SerializeToString()


# Op types onnxruntime's int8 quantizers can give integer weights, and the input holding the weight.
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "LSTM": 1, "Attention": 1}
# Ops a quantizer writes that carry quantized weights (what "it quantized something" means), and
# the activation quantizers that feed them.
QUANTIZED_WEIGHT_OPS = ("MatMulInteger", "ConvInteger", "DynamicQuantizeLSTM", "QAttention", "DynamicQuantizeMatMul", "MatMulNBits")
ACTIVATION_QUANTIZERS = ("DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear")


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies of an If / Loop / Scan (or any node with graph attributes)."""
    found = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend(attr.graphs)
    return found


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names the graph's nodes (and their subgraphs) read but the graph does not define: values an
    If / Loop / Scan body takes from the enclosing scope."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    reads: set[str] = set()
    for node in graph.node:
        defined.update(node.output)
        reads.update(node.input)
        for sub in subgraphs(node):
            reads |= outer_reads(sub)
    return reads - defined - {""}


def _node_reads(node: onnx.NodeProto) -> set[str]:
    """A node's inputs plus what its subgraphs read from this scope: an If must come after them too."""
    reads = set(node.input)
    for sub in subgraphs(node):
        reads |= outer_reads(sub)
    return reads - {""}


def sort_graph(graph: onnx.GraphProto) -> bool:
    """Order the nodes topologically, in place, subgraphs first. Stable: among the nodes that are
    ready, the earliest in the original order goes first, so a sorted graph keeps its order and the
    same input always gives the same bytes. Nodes left on a cycle keep their order at the end, for
    the checker to name. Returns whether anything moved."""
    moved = False
    for node in graph.node:
        for sub in subgraphs(node):
            moved |= sort_graph(sub)
    nodes = list(graph.node)
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.output:
            if name:
                producer.setdefault(name, i)
    users: list[list[int]] = [[] for _ in nodes]
    waiting = [0] * len(nodes)
    for i, node in enumerate(nodes):
        for j in {producer[name] for name in _node_reads(node) if name in producer} - {i}:
            users[j].append(i)
            waiting[i] += 1
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for user in users[i]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if order == list(range(len(nodes))):
        return moved
    placed = set(order)
    order += [i for i in range(len(nodes)) if i not in placed]
    ordered = [onnx.NodeProto.FromString(nodes[i].SerializeToString()) for i in order]  # copies: the field is cleared next
    del graph.node[:]
    graph.node.extend(ordered)
    return True


def weight_op_census(graph: onnx.GraphProto, op_types=tuple(WEIGHT_INPUT), outer: frozenset[str] = frozenset(), inside: bool = False) -> dict[str, list[int]]:
    """op type -> [count, count inside If/Loop/Scan bodies] of the nodes whose weight input (B of
    MatMul/Gemm, W of Conv/LSTM, the weights of Attention) is a float initializer of the node's
    graph or of an enclosing one: the ops an int8 quantizer could rewrite."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    visible = outer | {t.name for t in graph.initializer if t.data_type in floats}
    census: dict[str, list[int]] = {}
    for node in graph.node:
        index = WEIGHT_INPUT.get(node.op_type)
        if node.op_type in op_types and index is not None and len(node.input) > index and node.input[index] in visible:
            counts = census.setdefault(node.op_type, [0, 0])
            counts[0] += 1
            counts[1] += inside
        for sub in subgraphs(node):
            for op, (total, nested) in weight_op_census(sub, op_types, frozenset(visible), True).items():
                counts = census.setdefault(op, [0, 0])
                counts[0] += total
                counts[1] += nested
    return dict(sorted(census.items()))


def describe_census(census: dict[str, list[int]]) -> str:
    """'Conv: 4 (4 inside If/Loop/Scan bodies), MatMul: 1', or 'none'."""
    parts = [f"{op}: {total}" + (f" ({nested} inside If/Loop/Scan bodies)" if nested else "") for op, (total, nested) in census.items()]
    return ", ".join(parts) or "none"


def count_ops(graph: onnx.GraphProto, op_types) -> dict[str, int]:
    """How many nodes of each of op_types the graph holds, subgraphs included (sorted by op type)."""
    counts: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type in op_types:
            counts[node.op_type] += 1
        for sub in subgraphs(node):
            counts.update(count_ops(sub, op_types))
    return dict(sorted(counts.items()))


def check_published(path: Path, step: str) -> None:
    """Fail the step unless the written file passes onnx.checker.check_model(full_check=True). Given
    the path, not the proto: a model over 2 GB cannot be serialized into one protobuf, and the
    checker then reads its external data files itself."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:  # ValidationError, InferenceError, and plain errors from the C++ side
        raise StepError(step, f"the ONNX it wrote fails onnx.checker.check_model(full_check=True): {one_line(err)[:400]}") from None


def publish(model: onnx.ModelProto, path: Path, step: str, data: Path | None = None) -> None:
    """Sort the graph, write it, and check the written file with the full checker. With `data`, every
    tensor of 1 KiB or more goes to that one file (external data) instead: see save_external."""
    sort_graph(model.graph)
    if data is None:
        onnx.save(model, str(path))
        check_published(path, step)
    else:
        save_external(model, path, data, step)


# Tensors smaller than this stay inside the model file (onnx's own default): shapes and scalars
# that shape inference and the checker read without opening the data file.
EXTERNAL_MIN_BYTES = 1024


def save_external(model: onnx.ModelProto, path: Path, data: Path, step: str) -> None:
    """Write the model to `path` and its tensors to the single file `data`, the proto naming that file
    by its final name (data may be a temp file the step runner renames later), and check it.

    onnx.save writes the data file beside the model under the location the proto records, so both are
    written into a private folder under their final names, checked there (the checker reads the data
    it would publish, never an older file of the same name), then moved onto the given paths. Tensors
    are written in graph order by onnx, so the same model gives the same bytes. The proto is changed
    in place (its tensors then point into the file)."""
    location = final_name(data)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".kiln-onnx-") as tmp:
        staged = Path(tmp) / final_name(path)
        if staged.name == location:
            raise StepError(step, f"an ONNX model and its external data cannot share the name {location!r}")
        try:
            onnx.save(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=location, size_threshold=EXTERNAL_MIN_BYTES, convert_attribute=False)
        except Exception as err:  # protobuf's own errors (a graph whose structure alone is over 2 GB)
            raise StepError(step, f"cannot write the ONNX model with external data: {one_line(err)[:300]}") from None
        staged_data = Path(tmp) / location
        if not staged_data.exists():  # no tensor reached the threshold: an empty data file keeps the layout
            staged_data.touch()
        os.chmod(staged_data, staged.stat().st_mode & 0o777)  # onnx creates it 0600; readable as the model is
        check_published(staged, step)
        os.replace(staged, path)
        os.replace(staged_data, data)


def load(path: Path) -> onnx.ModelProto:
    """An ONNX file with its external data, for a rule to convert. Not onnx.load: onnx (1.17+) refuses
    a data file with several hard links (a guard against a crafted model reading other files), and
    kiln's step cache hard-links every output it stores, so each step's model.onnx.data has two."""
    model = onnx.load(str(path), load_external_data=False)
    load_external_data(model, path.parent)
    return model


def external_tensors(model: onnx.ModelProto) -> list[tuple[onnx.TensorProto, object]]:
    """(tensor, its onnx ExternalDataInfo) for every tensor of `model` kept in an external file."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    return [(tensor, ExternalDataInfo(tensor)) for tensor in _get_all_tensors(model) if uses_external_data(tensor)]


def external_locations(model: onnx.ModelProto) -> list[str]:
    """The external data files `model` names, in name order."""
    return sorted({info.location for _, info in external_tensors(model)})


def beside_the_model(location: str) -> bool:
    """Whether an external data location is a plain file name (in the model's folder): the only kind
    kiln reads or publishes, so a model cannot make it read files elsewhere."""
    return Path(location).name == location and location not in ("", ".", "..")


def load_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Read every external tensor of `model` into the proto from its file in `folder`. Only a plain file
    name beside the model is followed (what kiln writes), so nothing outside the folder is read."""
    for tensor, info in external_tensors(model):
        if not beside_the_model(info.location):
            raise ValueError(f"tensor {tensor.name!r}: external data location {info.location!r} is not a file name beside the model")
        with open(folder / info.location, "rb") as f:
            f.seek(info.offset or 0)
            data = f.read(info.length) if info.length else f.read()
        if info.length and len(data) != info.length:
            raise ValueError(f"tensor {tensor.name!r}: {info.location} ends before its {info.length} bytes at offset {info.offset}")
        tensor.raw_data = data
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def rename_outputs(model: onnx.ModelProto, names: list[str], step: str) -> None:
    """A converter's graph outputs renamed, by position, to the manifest's output names."""
    produced = [o.name for o in model.graph.output]
    if len(produced) != len(names):
        raise StepError(step, f"the converted model has {len(produced)} outputs {produced} but the manifest declares {len(names)}: {names}")
    renames = dict(zip(produced, names, strict=True))
    for node in model.graph.node:
        node.output[:] = [renames.get(n, n) for n in node.output]
        node.input[:] = [renames.get(n, n) for n in node.input]
    for output in model.graph.output:
        output.name = renames[output.name]


def canonicalize_converted(model: onnx.ModelProto) -> None:
    """A converter's model made reproducible: one import per domain (skl2onnx may list the default
    domain twice), in a fixed order, and the graph named "kiln" (converters name it with a random UUID)."""
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    del model.opset_import[:]
    for domain in sorted(versions):
        entry = model.opset_import.add()
        entry.domain, entry.version = domain, versions[domain]
    model.graph.name = "kiln"
