"""quantize_embeddings: Gather tables -> com.microsoft GatherBlockQuantized, checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.runtime.embeddings import dequantize_table, quantize_embeddings

VOCAB, DIM = 1000, 96  # 96: 8 bits falls back 128 -> 32, 4 bits has an odd block count (3) per row
MIN_ELEMENTS = 10_000


def embedding_model() -> onnx.ModelProto:
    """A word table read by two Gathers (int64 and int32 indices), a small position table under
    MIN_ELEMENTS, a tied table also read by a MatMul, and a big table whose rows (40) no block divides."""
    rng = np.random.default_rng(18)
    tables = {
        "word": rng.standard_normal((VOCAB, DIM)).astype(np.float32) * 0.05,
        "position": rng.standard_normal((16, DIM)).astype(np.float32),
        "tied": rng.standard_normal((300, DIM)).astype(np.float32),
        "odd_rows": rng.standard_normal((600, 40)).astype(np.float32),
    }
    seq = ["batch", "seq"]
    nodes = [
        helper.make_node("Gather", ["word", "ids"], ["word_vectors"], name="embed_words"),
        helper.make_node("Gather", ["position", "position_ids"], ["position_vectors"], name="embed_positions"),
        helper.make_node("Add", ["word_vectors", "position_vectors"], ["hidden"], name="add_positions"),
        helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32, name="to_int32"),
        helper.make_node("Gather", ["word", "ids32"], ["word_vectors_32"], name="embed_words_int32"),
        helper.make_node("Neg", ["word_vectors_32"], ["negated"], name="negate"),
        helper.make_node("Gather", ["tied", "position_ids"], ["tied_vectors"], name="embed_tied"),
        helper.make_node("MatMul", ["tied_vectors", "projection"], ["projected"], name="project"),
        helper.make_node("MatMul", ["scores", "tied"], ["tied_out"], name="lm_head"),
        helper.make_node("Gather", ["odd_rows", "position_ids"], ["odd_vectors"], name="embed_odd"),
    ]
    inits = [numpy_helper.from_array(t, name) for name, t in tables.items()]
    inits.append(numpy_helper.from_array(rng.standard_normal((DIM, 8)).astype(np.float32), "projection"))
    graph = helper.make_graph(
        nodes, "embeddings",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, seq),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, seq),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [*seq, 300])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [*seq, width]) for name, width in
         (("hidden", DIM), ("negated", DIM), ("projected", 8), ("tied_out", DIM), ("odd_vectors", 40))],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def feeds() -> dict:
    rng = np.random.default_rng(7)
    return {"ids": rng.integers(0, VOCAB, (3, 11)).astype(np.int64),
            "position_ids": rng.integers(0, 16, (3, 11)).astype(np.int64),
            "scores": rng.standard_normal((3, 11, 300)).astype(np.float32)}


def stored(model: onnx.ModelProto, names: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    inits = {t.name: t for t in model.graph.initializer}
    return tuple(numpy_helper.to_array(inits[names[part]]) for part in ("quantized", "scales", "zero_points"))


@pytest.mark.parametrize(("bits", "block", "ratio"), [(8, 32, 3.4), (4, 32, 6.1)])
def test_word_table_runs_in_onnxruntime_exactly_as_its_blocks_dequantize(bits, block, ratio):
    fp32 = embedding_model()
    model = embedding_model()
    results = {r["table"]: r for r in quantize_embeddings(model, bits, min_elements=MIN_ELEMENTS)}
    word = results["word"]
    assert (word["nodes"], word["shape"], word["bits"], word["block_size"]) == (["embed_words", "embed_words_int32"], [VOCAB, DIM], bits, block)
    assert "word" not in {t.name for t in model.graph.initializer}  # the fp32 table is gone
    assert {n.op_type for n in model.graph.node if n.name.startswith("embed_words")} == {"GatherBlockQuantized"}

    data, scales, zero_points = stored(model, word["initializers"])
    table = dequantize_table(data, scales, zero_points, bits, block)
    x = feeds()
    got, want = run(model, x), run(fp32, x)
    position = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "position"))
    # (a) bit for bit: onnxruntime computes float(q - zp) * scale, then the Add / Neg in float32
    assert np.array_equal(got["hidden"], table[x["ids"]] + position[x["position_ids"]])
    assert np.array_equal(got["negated"], -table[x["ids"]])
    for name in ("projected", "tied_out", "odd_vectors"):  # the tables left alone give the same outputs
        assert np.array_equal(got[name], want[name])

    # (b) every value within half a step of its block (plus float32 rounding of the arithmetic)
    weights = numpy_helper.to_array(next(t for t in fp32.graph.initializer if t.name == "word"))
    steps = np.abs(table - weights) / np.repeat(scales, block, axis=1)
    assert steps.max() <= 0.5 + 1e-4
    assert word["max_abs_error"] == float(np.abs(table - weights).max()) > 0

    # (c) the table's bytes, and the saved model by as much
    assert word["bytes_before"] == VOCAB * DIM * 4
    assert word["bytes_after"] == data.nbytes + scales.nbytes + zero_points.nbytes
    assert word["bytes_before"] / word["bytes_after"] > ratio
    saved = word["bytes_before"] - word["bytes_after"]
    assert len(fp32.SerializeToString()) - len(model.SerializeToString()) == pytest.approx(saved, abs=1000)
    assert any(op.domain == "com.microsoft" for op in model.opset_import)
    onnx.checker.check_model(model, full_check=True)  # what kiln's publish demands of every ONNX


def test_tables_it_cannot_shrink_stay_fp32_with_the_reason():
    model = embedding_model()
    results = {r["table"]: r for r in quantize_embeddings(model, 4, min_elements=MIN_ELEMENTS)}
    assert set(results) == {"word", "position", "tied", "odd_rows"}
    assert "under min_elements 10000" in results["position"]["skipped"]
    assert "MatMul node 'lm_head'" in results["tied"]["skipped"]
    assert "row length 40" in results["odd_rows"]["skipped"]
    kept = {t.name for t in model.graph.initializer}
    assert {"position", "tied", "odd_rows"} <= kept
    assert [n.op_type for n in model.graph.node if n.name in ("embed_positions", "embed_tied", "embed_odd")] == ["Gather"] * 3


def test_same_model_same_bytes():
    first, second = embedding_model(), embedding_model()
    quantize_embeddings(first, 8, min_elements=MIN_ELEMENTS)
    quantize_embeddings(second, 8, min_elements=MIN_ELEMENTS)
    assert first.SerializeToString() == second.SerializeToString()


def test_nothing_big_enough_leaves_the_model_untouched():
    model = embedding_model()
    before = model.SerializeToString()
    results = quantize_embeddings(model, 8, min_elements=VOCAB * DIM + 1)
    assert all("skipped" in r for r in results)
    assert model.SerializeToString() == before


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bits": 3}, "bits=3 is not supported; allowed: 8 or 4"),
    ({"bits": 4, "block_size": 48}, "block_size=48 for 4 bits is not allowed"),
    ({"bits": 4, "block_size": 512}, "to 256"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_embeddings(embedding_model(), **kwargs)
