"""kiln.runtime.onnx_graph: the stable topological sort every published ONNX goes through, the
census of weight ops quantizers report when they find nothing to do, and the publishing check."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from kiln.errors import StepError
from kiln.runtime.onnx_graph import check_published, count_ops, describe_census, publish, sort_graph, weight_op_census

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "build_rules"))
import tiny_onnx  # noqa: E402


def names(graph: onnx.GraphProto) -> list[str]:
    return [node.name for node in graph.node]


def chain_model(order: list[int]) -> onnx.ModelProto:
    """X -> a -> b -> c -> Y (three Relus), with its nodes listed in `order`, plus an independent
    Neg of X, listed first, that no sort should move after the others."""
    relus = [helper.make_node("Relu", [src], [dst], name=name) for name, src, dst in (("a", "X", "t1"), ("b", "t1", "t2"), ("c", "t2", "Y"))]
    nodes = [helper.make_node("Neg", ["X"], ["Z"], name="neg")] + [relus[i] for i in order]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("X", "Y", "Z")]
    model = helper.make_model(helper.make_graph(nodes, "chain", vi[:1], vi[1:]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_unsorted_nodes_are_sorted_and_sorted_ones_left_alone():
    model = chain_model([2, 0, 1])
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model, full_check=True)
    assert sort_graph(model.graph) is True
    assert names(model.graph) == ["neg", "a", "b", "c"]
    onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString()
    assert sort_graph(model.graph) is False and model.SerializeToString() == before


def test_the_sort_is_stable_where_the_order_was_already_valid():
    """Only what must move moves: the fp16 converter's input Casts come first, the rest keeps its order."""
    graph = chain_model([0, 1, 2]).graph
    cast = helper.make_node("Identity", ["X0"], ["X"], name="cast_in")
    graph.node.append(cast)  # appended last, as onnxruntime's converter does
    graph.input[0].name = "X0"
    sort_graph(graph)
    assert names(graph) == ["cast_in", "neg", "a", "b", "c"]


def if_model_reading_outer_value() -> onnx.ModelProto:
    """An If whose branch reads 'h', a value computed in the main graph, listed after the If; and
    an unsorted body inside the branch."""
    body = helper.make_graph([
        helper.make_node("Relu", ["inner"], ["out"], name="inner_relu"),
        helper.make_node("Neg", ["h"], ["inner"], name="inner_neg"),
    ], "then", [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Identity", ["X"], ["o2"], name="else_id")], "else", [], [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("If", ["cond"], ["Y"], name="branch", then_branch=body, else_branch=other),
        helper.make_node("Relu", ["X"], ["h"], name="make_h"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_subgraphs_are_sorted_and_an_if_follows_what_its_branches_read():
    model = if_model_reading_outer_value()
    sort_graph(model.graph)
    assert names(model.graph) == ["make_h", "branch"]  # the branch reads h: h's producer goes first
    then = model.graph.node[1].attribute[0].g if model.graph.node[1].attribute[0].name == "then_branch" else model.graph.node[1].attribute[1].g
    assert names(then) == ["inner_neg", "inner_relu"]
    onnx.checker.check_model(model, full_check=True)


def test_census_counts_weight_ops_inside_branches_and_only_those_with_weights(tmp_path):
    census = weight_op_census(onnx.load(str(tiny_onnx.branch_model(tmp_path / "b.onnx", "Conv"))).graph)
    assert census == {"Conv": [2, 2]} and describe_census(census) == "Conv: 2 (2 inside If/Loop/Scan bodies)"
    tiny = weight_op_census(onnx.load(str(tiny_onnx.tiny_model(tmp_path / "t.onnx"))).graph)
    assert tiny == {"Gemm": [2, 0], "MatMul": [2, 0]}  # scores and mix multiply two activations: not counted
    assert describe_census(weight_op_census(onnx.load(str(tiny_onnx.weightless_model(tmp_path / "w.onnx"))).graph)) == "none"


def test_count_ops_looks_inside_branches(tmp_path):
    graph = onnx.load(str(tiny_onnx.branch_model(tmp_path / "b.onnx"))).graph
    assert count_ops(graph, ("MatMul", "If")) == {"If": 1, "MatMul": 2}


def test_publish_writes_a_sorted_model_the_checker_accepts(tmp_path):
    path = tmp_path / "m.onnx"
    publish(chain_model([1, 2, 0]), path, "m:t:rule")
    assert names(onnx.load(str(path)).graph) == ["neg", "a", "b", "c"]


def test_a_model_the_checker_rejects_fails_the_step_in_one_line(tmp_path):
    model = chain_model([0, 1, 2])
    model.graph.node[1].input[0] = "missing"  # a's input exists nowhere
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(StepError, match=r"^m:t:rule: the ONNX it wrote fails onnx.checker.check_model\(full_check=True\): .*missing") as err:
        check_published(path, "m:t:rule")
    assert "\n" not in str(err.value)


def test_a_weight_in_the_main_graph_counts_for_an_op_inside_a_branch(tmp_path):
    graph = onnx.load(str(tiny_onnx.branch_model(tmp_path / "b.onnx"))).graph
    assert weight_op_census(graph) == {"MatMul": [2, 2]}  # then: W_outer (main graph), else: W_local (its own)
    assert "W_outer" in {t.name for t in graph.initializer}  # so the then-branch's weight is an outer one
