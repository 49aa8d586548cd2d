"""kiln.runtime.onnxrt.SharedWeights: sessions fed the model's large weights as external initializers
compute what a session of the whole model computes, weights read only inside subgraphs included."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kiln.runtime.onnxrt import SharedWeights, session


def if_model() -> onnx.ModelProto:
    """Y = X @ W when C, else X: W (16 KiB) is read only by the If's then-branch."""
    w = (np.arange(64 * 64, dtype=np.float32).reshape(64, 64) - 2000.0) / 997.0
    then_g = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y1"])], "then", [], [helper.make_tensor_value_info("Y1", TensorProto.FLOAT, [2, 64])])
    else_g = helper.make_graph([helper.make_node("Identity", ["X"], ["Y2"])], "else", [], [helper.make_tensor_value_info("Y2", TensorProto.FLOAT, [2, 64])])
    graph = helper.make_graph([helper.make_node("If", ["C"], ["Y"], then_branch=then_g, else_branch=else_g)], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 64]), helper.make_tensor_value_info("C", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 64])], [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_weight_read_only_in_a_subgraph_is_handed_over_and_gives_the_same_bits():
    model = if_model()
    whole = session(model.SerializeToString())
    shared = SharedWeights(model)
    assert list(shared.arrays) == ["W"] and model.ByteSize() < 1024  # the proto kept only the weight's name and shape
    slim = session(model.SerializeToString(), external=shared.used_by(model))
    feed = {"X": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32), "C": np.array(True)}
    assert whole.run(None, feed)[0].tobytes() == slim.run(None, feed)[0].tobytes()


def test_small_and_non_float_tensors_stay_in_the_proto():
    model = if_model()
    model.graph.initializer.append(numpy_helper.from_array(np.ones(8, np.float32), "small"))
    model.graph.initializer.append(numpy_helper.from_array(np.ones(4096, np.int64), "ints"))
    shared = SharedWeights(model)
    assert set(shared.arrays) == {"W"}
    kept = {t.name: t for t in model.graph.initializer}
    assert kept["small"].data_location == TensorProto.DEFAULT and kept["ints"].data_location == TensorProto.DEFAULT
