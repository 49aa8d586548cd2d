"""Large embedding tables as onnxruntime's com.microsoft GatherBlockQuantized: 8-bit or 4-bit blocks.

The word embedding is most of a quantized transformer's bytes: MatMul quantizers leave its Gather in
fp32. quantize_embeddings rewrites each Gather of a big float32 table into GatherBlockQuantized, with
the table quantized asymmetrically in blocks of `block_size` values along each row, by kiln's native
kernels (kiln.native.repack).

The form onnxruntime's CPU kernel runs (checked against onnxruntime 1.32, tests/runtime/test_embeddings.py):
data uint8 with the `bits` attribute, gather_axis 0, quantize_axis 1 (the last axis: required for
uint8 data), float32 scales [V, D / block] (the output takes the scales' type), uint8 zero points;
int32 and int64 indices alike. Per value: output = float(q - zero_point) * scale, one float32 rounding
(dequantize_table below is its numpy twin).
- bits 8: data [V, D], zero points [V, D / block]. The table viewed as [V * D / block, block] rows is
  exactly per-row DynamicQuantizeLinear (uint8), so repack.quantize_int8(axis=0) makes it.
- bits 4: data [V, D / 2], two values a byte, the lower column in the low nibble; zero points
  [V, ceil(D / block / 2)], block 2j in the low nibble, an odd count padded. That is byte for byte the
  MatMulNBits layout of table.T (K = D, N = V), so repack.quantize_int4 of the transposed table makes it.
Both keep 0.0 exact (the range is widened to hold 0) and put every value within half a step of its block.

One behaviour differs from Gather and is said in every step's facts (OUT_OF_RANGE_NOTE): an index
outside the table gives a row of zeros, where fp32 Gather fails the run. A token id beyond the
vocabulary (a tokenizer that does not match the model) therefore passes silently through a
quantized artifact; validation data, tokenized by the model's own tokenizer, never holds one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import onnx

MS_DOMAIN = "com.microsoft"
DEFAULT_BLOCK_SIZE = {8: 128, 4: 32}
SMALLEST_BLOCK = 16  # GatherBlockQuantized's floor (a power of two, at least 16)
LARGEST_INT4_BLOCK = 256  # the native int4 packer's ceiling
OUT_OF_RANGE_NOTE = ("GatherBlockQuantized returns a row of zeros for an index outside its table where fp32 Gather "
                     "fails: feed only ids the model's tokenizer makes")


def quantize_embeddings(model: onnx.ModelProto, bits: int, block_size: int | None = None, min_elements: int = 1 << 16) -> list[dict]:
    """Rewrite, in place, every top-level Gather (axis 0) of a 2-D float32 initializer of at least
    min_elements values, read by nothing but such Gathers, into GatherBlockQuantized; the fp32 table
    is removed. block_size (default 128 for 8 bits, 32 for 4) is halved down to 16 until it divides
    the row length. Returns, per table read by a Gather, {"table", "nodes", "shape", "bits",
    "block_size", "bytes_before", "bytes_after", "max_abs_error", "initializers"} or {"table",
    "skipped": reason}. The same model always gives the same bytes."""
    start = _check_arguments(bits, block_size, min_elements)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    gathers = _gathers_by_table(graph, inits)
    readers = _readers(graph)
    taken = _names_in_use(graph)
    results, removed, added = [], [], []
    for name, nodes in gathers.items():
        table = inits[name]
        reason = _why_not(table, nodes, readers[name], graph, min_elements)
        block = None if reason else _block_size_for(table.dims[1], start)
        if reason is None and block is None:
            reason = f"its row length {table.dims[1]} is a multiple of none of the block sizes {_block_ladder(start)}"
        if reason:
            results.append({"table": name, "skipped": reason})
            continue
        tensors, result = _quantize_table(table, nodes, bits, block, taken)
        results.append(result)
        removed.append(name)
        added.extend(tensors)
    if removed:
        _replace_initializers(graph, set(removed), added)
        _ensure_ms_opset(model)
    return results


def dequantize_table(data: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """The float32 table [V, D] GatherBlockQuantized reads out of uint8 blocks: float(q - zp) * scale,
    as onnxruntime's CPU kernel computes each value (one float32 rounding, no fused multiply-add)."""
    import numpy as np

    if bits == 8:
        q, zp = data.astype(np.int32), zero_points.astype(np.int32)
    else:
        q = _unpack_nibbles(data)
        zp = _unpack_nibbles(zero_points)[:, : scales.shape[1]]
    zp_per_value = np.repeat(zp, block_size, axis=1)
    scale_per_value = np.repeat(scales.astype(np.float32), block_size, axis=1)
    return (q - zp_per_value).astype(np.float32) * scale_per_value


# ---------------------------------------------------------------- which tables


def _check_arguments(bits: int, block_size: int | None, min_elements: int) -> int:
    if bits not in DEFAULT_BLOCK_SIZE:
        raise ValueError(f"quantize_embeddings: bits={bits!r} is not supported; allowed: 8 or 4")
    start = DEFAULT_BLOCK_SIZE[bits] if block_size is None else block_size
    largest = LARGEST_INT4_BLOCK if bits == 4 else None
    if not isinstance(start, int) or start < SMALLEST_BLOCK or start & (start - 1) or (largest and start > largest):
        allowed = f"a power of two from {SMALLEST_BLOCK}" + (f" to {largest}" if largest else "")
        raise ValueError(f"quantize_embeddings: block_size={block_size!r} for {bits} bits is not allowed; allowed: {allowed}")
    if min_elements < 1:
        raise ValueError(f"quantize_embeddings: min_elements={min_elements!r} must be at least 1")
    return start


def _gathers_by_table(graph: onnx.GraphProto, inits: dict) -> dict[str, list[onnx.NodeProto]]:
    """Float initializers read as the data of top-level ONNX Gathers -> those nodes, in graph order.
    Integer tables (shape and index constants) are not embeddings and are left out."""
    import onnx

    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and node.input:
            table = inits.get(node.input[0])
            if table is not None and table.data_type in floats:
                found.setdefault(table.name, []).append(node)
    return found


def _readers(graph: onnx.GraphProto) -> dict[str, list[str]]:
    """Value name -> what reads it: 'Op node name' per top-level node (an If / Loop / Scan also for
    what its bodies read from this scope), and 'graph output'."""
    from collections import defaultdict

    from kiln.runtime.onnx_graph import outer_reads, subgraphs

    readers: dict[str, list[str]] = defaultdict(list)
    for node in graph.node:
        reads = set(node.input)
        for sub in subgraphs(node):
            reads |= outer_reads(sub)
        for name in reads - {""}:
            readers[name].append(f"{node.op_type} node {node.name!r}")
    for out in graph.output:
        readers[out.name].append("graph output")
    return readers


def _why_not(table: onnx.TensorProto, nodes: list, readers: list[str], graph: onnx.GraphProto, min_elements: int) -> str | None:
    """Why this Gather table stays as it is, or None when it can be quantized."""
    import onnx

    dims = list(table.dims)
    if table.data_type != onnx.TensorProto.FLOAT:
        return f"it is {onnx.TensorProto.DataType.Name(table.data_type)}; only FLOAT tables are quantized"
    if len(dims) != 2:
        return f"it is {len(dims)}-D {dims}; only 2-D tables [rows, dim] are quantized"
    size = dims[0] * dims[1]
    if size < min_elements:
        return f"it has {size} values {dims}, under min_elements {min_elements}"
    for node in nodes:
        axis = _int_attr(node, "axis", 0)
        if axis not in (0, -2):
            return f"Gather node {node.name!r} gathers along axis {axis}; only axis 0 (rows) is quantized"
    its_gathers = {f"Gather node {node.name!r}" for node in nodes}
    others = [r for r in readers if r not in its_gathers]
    if others:
        return f"it is also read by {others[0]}: the fp32 table would stay for it, so quantizing its Gathers saves nothing"
    if any(i.name == table.name for i in graph.input):
        return "it is also a graph input, which a caller may replace at run time"
    if table.data_location == onnx.TensorProto.EXTERNAL:
        return "its data is external and was not loaded (onnx.load with load_external_data=True)"
    return None


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return attr.i
    return default


def _block_ladder(start: int) -> list[int]:
    """start, start / 2, ... down to the smallest block GatherBlockQuantized takes."""
    ladder = []
    while start >= SMALLEST_BLOCK:
        ladder.append(start)
        start //= 2
    return ladder


def _block_size_for(dim: int, start: int) -> int | None:
    """The largest block of the ladder that divides a row: blocks never straddle rows, and the 4-bit
    data's packed row must hold exactly dim values."""
    return next((b for b in _block_ladder(start) if dim % b == 0), None)


# ---------------------------------------------------------------- the rewrite


def _quantize_table(table: onnx.TensorProto, nodes: list, bits: int, block: int, taken: set[str]) -> tuple[list, dict]:
    """(the three new initializers, the report entry); rewrites the table's Gather nodes in place."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    weights = numpy_helper.to_array(table)
    data, scales, zero_points = (_blocks_8bit if bits == 8 else _blocks_4bit)(weights, block)
    names = {part: _fresh_name(f"{table.name}_{part}", taken) for part in ("quantized", "scales", "zero_points")}
    tensors = [numpy_helper.from_array(array, names[part]) for part, array in
               (("quantized", data), ("scales", scales), ("zero_points", zero_points))]
    error = np.abs(dequantize_table(data, scales, zero_points, bits, block) - weights).max()
    node_names = []
    for index, node in enumerate(nodes):
        name = node.name or _fresh_name(f"GatherBlockQuantized_{index}_{table.name}", taken)
        rewritten = onnx.helper.make_node(
            "GatherBlockQuantized", [names["quantized"], node.input[1], names["scales"], names["zero_points"]],
            list(node.output), name=name, domain=MS_DOMAIN,
            bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
        node.CopyFrom(rewritten)  # same place in the graph, same outputs
        node_names.append(name)
    result = {
        "table": table.name, "nodes": node_names, "shape": list(weights.shape), "bits": bits, "block_size": block,
        "bytes_before": int(weights.nbytes), "bytes_after": int(data.nbytes + scales.nbytes + zero_points.nbytes),
        "max_abs_error": float(error), "initializers": names,
    }
    return tensors, result


def _blocks_8bit(weights: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 data [V, D], float32 scales and uint8 zero points [V, D / block]."""
    from kiln.native import repack

    rows, dim = weights.shape
    q, scales, zero_points = repack.quantize_int8(weights.reshape(-1, block), symmetric=False, axis=0)
    return q.reshape(rows, dim), scales.reshape(rows, dim // block), zero_points.reshape(rows, dim // block)


def _blocks_4bit(weights: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 data [V, D / 2], float32 scales [V, D / block], uint8 zero points [V, ceil(D / block / 2)]."""
    from kiln.native import repack

    rows, dim = weights.shape
    packed, scales, zero_points = repack.quantize_int4(repack.transpose2d(weights), block, symmetric=False)
    return packed.reshape(rows, dim // 2), scales.reshape(rows, dim // block), zero_points.reshape(rows, -1)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [R, C] -> int32 [R, 2C], the low nibble first."""
    import numpy as np

    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1).astype(np.int32)


def _names_in_use(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {v.name for v in graph.output}
    for node in graph.node:
        names.update(node.output)
        names.add(node.name)
    return names


def _fresh_name(wanted: str, taken: set[str]) -> str:
    name, n = wanted, 1
    while name in taken:
        name, n = f"{wanted}_{n}", n + 1
    taken.add(name)
    return name


def _replace_initializers(graph: onnx.GraphProto, removed: set[str], added: list) -> None:
    """Drop the fp32 tables (and any value_info of them) and append the quantized blocks."""
    for index in reversed([i for i, t in enumerate(graph.initializer) if t.name in removed]):
        del graph.initializer[index]
    for index in reversed([i for i, v in enumerate(graph.value_info) if v.name in removed]):
        del graph.value_info[index]
    graph.initializer.extend(added)


def _ensure_ms_opset(model: onnx.ModelProto) -> None:
    import onnx

    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))


def quantize_for_target(model, option: str, notes: dict[int, list[dict]]) -> None:
    """options.embeddings ("fp32", "int8", "int4") applied to a freshly quantized model, what was
    done kept in notes under id(model): a search quantizes several candidates, the chosen one counts
    (embedding_facts)."""
    if option != "fp32":
        notes[id(model)] = quantize_embeddings(model, bits=int(option[3:]))


def embedding_facts(notes: dict[int, list[dict]], model) -> dict:
    """The step facts of the embeddings rewrite applied to `model` (notes as quantize_for_target fills them)."""
    done = notes.get(id(model))
    return {} if done is None else {"embeddings": done, "embeddings_note": OUT_OF_RANGE_NOTE}
