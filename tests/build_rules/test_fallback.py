"""options.fallback = "auto" through the quantize rules: the scan ranks the layers (only when the
all-quantized model fails, and once per model and settings: a memo in the workspace), the search
keeps the fewest that meet the gates, and the written model meets them when measured afresh, as the
validate step will measure it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from budget_models import BUDGET, calibration, reference, sensitive_model
from kiln.errors import StepError
from kiln.rules import RunContext, get_rule
from kiln.runtime.reference import ReferenceSet, worst_over_outputs
from kiln.runtime.onnxrt import session


SCANS = {"quantize_int4": {"quantization": "int4"}, "quantize_dynamic": {"quantization": "dynamic"}, "quantize_static": {"quantization": "static"}}


def run_rule(name: str, tmp_path: Path, inputs: dict, out: Path, **params) -> dict:
    rule = get_rule(name)
    return rule().run(inputs, {"model": out}, rule.Params(**params), RunContext(tmp_path, f"test/{name}"))


def fallback(rule: str, goal: dict) -> dict:
    """params.fallback as the plan writes it: the gates, what they are measured on, the scan settings."""
    return BUDGET | {"goal": goal, "scan": SCANS[rule]}


def nodes_kept(facts: dict) -> list[str]:
    return [kept["node"] for kept in facts["fallback"]["kept"]]


def memos(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "build/.kiln/scans").glob("*.json"))


def measured(model: Path, refs: Path) -> dict:
    sess = session(model)
    return worst_over_outputs(ReferenceSet(refs, ["Y"], None, "t").metrics(lambda feed: {"Y": sess.run(["Y"], feed)[0]}))


@pytest.fixture
def sensitive(tmp_path):
    model = sensitive_model(tmp_path)
    return model, reference(tmp_path, model)


@pytest.mark.parametrize("rule", ["quantize_int4", "quantize_dynamic"])
def test_the_fewest_layers_that_meet_the_goal_are_kept(tmp_path, sensitive, rule):
    model, refs = sensitive
    run_rule(rule, tmp_path, {"model": [model]}, tmp_path / "plain.onnx")
    plain = measured(tmp_path / "plain.onnx", refs)
    goal = round(1 - (1 - plain["min_cosine"]) / 4, 4)  # well above what quantizing everything gives
    out = tmp_path / "kept.onnx"
    facts = run_rule(rule, tmp_path, {"model": [model], "reference": [refs]}, out, fallback=fallback(rule, {"min_cosine": goal}))
    fallback_facts = facts["fallback"]
    assert fallback_facts["passed"] and 1 <= len(fallback_facts["kept"]) < 4 and fallback_facts["trials"][0]["min_cosine"] < goal
    assert fallback_facts["scan"] | {"seconds": 0} == {"ran": True, "reused": False, "layers": 4, "samples": 15, "seconds": 0}
    assert measured(out, refs)["min_cosine"] >= goal  # measured afresh on the written file
    nodes = {n.name: n for n in onnx.load(str(out)).graph.node}
    for kept in fallback_facts["kept"]:
        node = nodes.get(kept["node"]) or nodes.get(f"{kept['node']}_MatMul")  # onnxruntime's quantizer may split a Gemm
        if rule == "quantize_int4":
            assert node.op_type == "MatMulNBits" and {a.name: a.i for a in node.attribute}["bits"] == 8
        else:
            assert node.op_type in ("MatMul", "Gemm")  # kept in fp32
    assert fallback_facts["bytes_cost"] > 0 and set(fallback_facts["latency_ms"]) == {"all_quantized", "with_fallback", "alone"}
    assert fallback_facts["kept_as"] == ("8-bit blocks (int8 activations)" if rule == "quantize_int4" else "float")


def test_an_unreachable_goal_fails_the_step_with_its_trials(tmp_path, sensitive):
    model, refs = sensitive
    with pytest.raises(StepError, match="gates fail even with 4 of the 4 scanned layers kept") as err:
        run_rule("quantize_int4", tmp_path, {"model": [model], "reference": [refs]}, tmp_path / "never.onnx",
                 fallback=fallback("quantize_int4", {"max_abs_diff": 1e-9}))
    assert [t["kept"] for t in err.value.facts["fallback"]["trials"]][-1] == 4
    assert err.value.facts["fallback"]["scan"]["ran"] is True
    assert not (tmp_path / "never.onnx").exists()


@pytest.mark.parametrize("rule", ["quantize_int4", "quantize_dynamic"])
def test_a_model_that_passes_fully_quantized_is_never_scanned(tmp_path, sensitive, rule):
    model, refs = sensitive
    run_rule(rule, tmp_path, {"model": [model]}, tmp_path / "plain.onnx")
    out = tmp_path / "auto.onnx"
    facts = run_rule(rule, tmp_path, {"model": [model], "reference": [refs]}, out, fallback=fallback(rule, {"min_cosine": -1.0}))
    assert facts["fallback"]["scan"] == {"ran": False, "why": "the all-quantized model passes the gates"}
    assert facts["fallback"]["kept"] == [] and [t["kept"] for t in facts["fallback"]["trials"]] == [0]
    assert memos(tmp_path) == [] and out.read_bytes() == (tmp_path / "plain.onnx").read_bytes()


def test_a_second_step_with_other_gates_reuses_the_scan_and_a_corrupt_memo_is_rescanned(tmp_path, sensitive):
    model, refs = sensitive
    inputs = {"model": [model], "reference": [refs]}
    run_rule("quantize_dynamic", tmp_path, {"model": [model]}, tmp_path / "plain.onnx")
    goal = round(1 - (1 - measured(tmp_path / "plain.onnx", refs)["min_cosine"]) / 4, 4)
    first = run_rule("quantize_dynamic", tmp_path, inputs, tmp_path / "first.onnx", fallback=fallback("quantize_dynamic", {"min_cosine": goal}))
    assert first["fallback"]["scan"]["ran"] and not first["fallback"]["scan"]["reused"] and len(memos(tmp_path)) == 1
    # other gates (a loose one added): the same scan from the memo, the same layers kept, the same bytes
    other = run_rule("quantize_dynamic", tmp_path, inputs, tmp_path / "other.onnx",
                     fallback=fallback("quantize_dynamic", {"min_cosine": goal, "max_abs_diff": 1e6}))
    assert other["fallback"]["scan"] | {"seconds": 0} == {"ran": True, "reused": True, "layers": 4, "samples": 15, "seconds": 0}
    assert nodes_kept(other) == nodes_kept(first) and len(memos(tmp_path)) == 1
    assert (tmp_path / "other.onnx").read_bytes() == (tmp_path / "first.onnx").read_bytes()
    memo = memos(tmp_path)[0]
    memo.write_text("{not json")
    again = run_rule("quantize_dynamic", tmp_path, inputs, tmp_path / "again.onnx", fallback=fallback("quantize_dynamic", {"min_cosine": goal}))
    assert again["fallback"]["scan"]["ran"] and not again["fallback"]["scan"]["reused"] and again["fallback"]["kept"] == first["fallback"]["kept"]
    assert json.loads(memo.read_text())["samples"] == 15  # rewritten
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "first.onnx").read_bytes()


def test_static_int8_scans_with_its_own_ranges_and_keeps_the_fewest_layers(tmp_path, sensitive):
    model, refs = sensitive
    inputs = {"model": [model], "calibration": [calibration(tmp_path, model, refs)]}
    run_rule("quantize_static", tmp_path, inputs, tmp_path / "plain.onnx")
    plain = measured(tmp_path / "plain.onnx", refs)
    goal = round(1 - (1 - plain["min_cosine"]) / 4, 4)
    out = tmp_path / "kept.onnx"
    facts = run_rule("quantize_static", tmp_path, inputs | {"reference": [refs]}, out, fallback=fallback("quantize_static", {"min_cosine": goal}))
    assert facts["fallback"]["passed"] and facts["fallback"]["scan"]["ran"] and 1 <= len(facts["fallback"]["kept"]) < 4
    assert measured(out, refs)["min_cosine"] >= goal


def test_int4_kept_layers_compute_what_their_8_bit_blocks_hold(tmp_path, sensitive):
    """The 8-bit layout kiln writes for MatMulNBits is what onnxruntime reads: an all-8-bit model
    equals the fp32 model with every weight replaced by its dequantized blocks."""
    from kiln.build_rules.quantize_int4 import QuantizeInt4Params, _quantize, int8_blocks
    from kiln.runtime.onnx_graph import layers_to_quantize, load

    model = load(sensitive[0])
    layers = layers_to_quantize(model, [], "t")
    eight = _quantize(model, layers, [layer.node.name for layer in layers], QuantizeInt4Params(), {})
    assert {n.op_type for n in eight.graph.node if n.name.startswith("fc")} == {"MatMulNBits"}
    w = np.random.default_rng(0).standard_normal((300, 40)).astype(np.float32)  # K not a multiple of the block
    B, scales, zero_points = int8_blocks(w, 128)
    back = ((B.astype(np.float32) - zero_points.reshape(40, 3, 1)) * scales.reshape(40, 3, 1)).reshape(40, 384)[:, :300].T
    assert B.shape == (40, 3, 128) and np.abs(back - w).max() <= scales.max() / 2 + 1e-6


def test_a_static_layer_kept_in_fp32_reads_the_float_activation_even_when_it_shares_it(tmp_path):
    """onnxruntime's QDQ quantizer points every reader of a quantized activation at its dequantized
    copy; a layer kept fp32 beside a quantized one (Q, K and V read one tensor) must not see it."""
    from onnx import TensorProto, helper, numpy_helper

    from kiln.native.calibration import Calibration

    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((16, 8)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W1"], ["a"], name="q"), helper.make_node("MatMul", ["X", "W2"], ["b"], name="k"),
         helper.make_node("Add", ["a", "b"], ["Y"], name="sum")], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", 16])], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    source = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    calibration = Calibration(256)
    calibration.update("X", rng.standard_normal((64, 16)).astype(np.float32))
    (tmp_path / "calibration.json").write_text(calibration.to_json())
    out = tmp_path / "q.onnx"
    run_rule("quantize_static", tmp_path, {"model": [source], "calibration": [tmp_path / "calibration.json"]}, out, exclude_nodes=["k"])
    nodes = {n.name: n for n in onnx.load(str(out)).graph.node}
    assert nodes["k"].input[0] == "X" and nodes["q"].input[0] != "X"  # q reads the QDQ copy, k the float tensor


def test_int8_always_leaves_a_layer_quantized(tmp_path, sensitive):
    model, refs = sensitive
    with pytest.raises(StepError, match="fail even with 3 of the 4 scanned layers kept"):
        run_rule("quantize_dynamic", tmp_path, {"model": [model], "reference": [refs]}, tmp_path / "never.onnx",
                 fallback=fallback("quantize_dynamic", {"max_abs_diff": 1e-9}))
