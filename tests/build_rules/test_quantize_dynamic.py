"""quantize_dynamic: onnxruntime's dynamic int8 quantizer, reaching weight ops inside If bodies, and
failing (in one line, naming what the graph has and the option to set) rather than publishing an
fp32 model as int8. Every model it writes passes onnx's full checker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import tiny_onnx
from kiln.errors import StepError
from kiln.rules import RunContext, get_rule
from kiln.runtime.onnx_graph import count_ops
from kiln.runtime.onnxrt import session

STEP = "m:onnx_int8:quantize_dynamic"


def quantize(tmp_path: Path, source: Path, name: str = "q8.onnx", **params) -> tuple[Path, dict]:
    rule = get_rule("quantize_dynamic")
    out = tmp_path / name
    facts = rule().run({"model": [source]}, {"model": out}, rule.Params(**params), RunContext(tmp_path, STEP))
    return out, facts


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    got, want = got.reshape(len(got), -1), want.reshape(len(want), -1)
    return (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)


def test_weight_layers_are_quantized_counted_and_checked(tmp_path):
    source = tiny_onnx.tiny_model(tmp_path / "fp32.onnx")
    out, facts = quantize(tmp_path, source)
    assert facts["quantized_ops"] == {"DynamicQuantizeLinear": 4, "MatMulInteger": 4}  # fc1, fc2, fc2_again, fc3
    onnx.checker.check_model(str(out), full_check=True)
    x = np.random.default_rng(3).standard_normal((6, 4, tiny_onnx.K)).astype(np.float32)
    (got,) = session(out).run(["Y"], {"X": x})
    (want,) = session(source).run(["Y"], {"X": x})
    assert cosines(got, want).min() > 0.99 and not np.array_equal(got, want)


@pytest.mark.parametrize("positive", [True, False], ids=["then", "else"])
def test_matmuls_inside_if_branches_are_quantized(tmp_path, positive):
    """The finding: weights inside If bodies were left fp32 and the "int8" model equalled the source."""
    source = tiny_onnx.branch_model(tmp_path / "branch.onnx")
    out, facts = quantize(tmp_path, source)
    assert facts["quantized_ops"]["MatMulInteger"] == 2  # one per branch: W_outer (main graph) and W_local (the branch's)
    assert count_ops(onnx.load(str(out)).graph, ("MatMul",)) == {}
    onnx.checker.check_model(str(out), full_check=True)
    x = np.abs(np.random.default_rng(4).standard_normal((5, tiny_onnx.K)).astype(np.float32)) * (1 if positive else -1)
    (got,) = session(out).run(["Y"], {"X": x})
    (want,) = session(source).run(["Y"], {"X": x})
    assert cosines(got, want).min() > 0.99 and not np.array_equal(got, want)


def test_convs_inside_branches_fail_by_default_naming_them_and_the_option(tmp_path):
    source = tiny_onnx.branch_model(tmp_path / "branch.onnx", "Conv")
    with pytest.raises(StepError) as err:
        quantize(tmp_path, source)
    assert str(err.value) == (
        f"{STEP}: dynamic int8 quantized nothing with op_types ['Attention', 'LSTM', 'MatMul']; the graph's ops with weights: "
        "Conv: 2 (2 inside If/Loop/Scan bodies): add Conv to options.op_types (now ['Attention', 'LSTM', 'MatMul'])")


def test_convs_inside_branches_are_quantized_when_asked(tmp_path):
    source = tiny_onnx.branch_model(tmp_path / "branch.onnx", "Conv")
    out, facts = quantize(tmp_path, source, op_types=["Conv"])
    assert facts["quantized_ops"] == {"ConvInteger": 2, "DynamicQuantizeLinear": 1}
    onnx.checker.check_model(str(out), full_check=True)
    x = np.abs(np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32))
    (got,) = session(out).run(["Y"], {"X": x})
    (want,) = session(source).run(["Y"], {"X": x})
    assert cosines(got, want).min() > 0.99


def test_lstm_weights_are_quantized_by_default(tmp_path):
    source = tiny_onnx.lstm_model(tmp_path / "lstm.onnx")
    out, facts = quantize(tmp_path, source)
    assert facts["quantized_ops"] == {"DynamicQuantizeLSTM": 1}
    x = np.random.default_rng(6).standard_normal((7, 2, tiny_onnx.K)).astype(np.float32)
    (got,) = session(out).run(["Y"], {"X": x})
    (want,) = session(source).run(["Y"], {"X": x})
    np.testing.assert_allclose(got, want, atol=0.05)


def test_a_model_without_weight_ops_fails(tmp_path):
    with pytest.raises(StepError, match=r"quantized nothing with op_types \['Attention', 'LSTM', 'MatMul'\]: the model has no MatMul/Gemm/Conv/LSTM/Attention with a weight initializer"):
        quantize(tmp_path, tiny_onnx.weightless_model(tmp_path / "w.onnx"))


def test_excluded_gemms_really_stay_fp32(tmp_path):
    """onnxruntime renames a Gemm to <name>_MatMul before quantizing: excluding 'fc1' must still work."""
    source = tiny_onnx.tiny_model(tmp_path / "fp32.onnx")
    out, facts = quantize(tmp_path, source, exclude_nodes=["fc1", "fc2"])
    assert facts["quantized_ops"]["MatMulInteger"] == 2  # fc2_again and fc3
    kept = {n.name: n.op_type for n in onnx.load(str(out)).graph.node}
    assert kept["fc1_MatMul"] == "MatMul" and kept["fc2"] == "MatMul"


def test_excluding_every_layer_fails_instead_of_publishing_fp32(tmp_path):
    source = tiny_onnx.tiny_model(tmp_path / "fp32.onnx")
    with pytest.raises(StepError, match=r"the graph's ops with weights: Gemm: 2, MatMul: 2: options.exclude_nodes \(4 nodes\) leaves none of them"):
        quantize(tmp_path, source, exclude_nodes=["fc1", "fc2", "fc2_again", "fc3"])


def test_bytes_are_reproducible(tmp_path):
    source = tiny_onnx.branch_model(tmp_path / "branch.onnx")
    a, _ = quantize(tmp_path, source, "a.onnx")
    b, _ = quantize(tmp_path, source, "b.onnx")
    assert a.read_bytes() == b.read_bytes()


# ---- options.op_types: from the manifest to this rule ----------------------------------------------


def test_the_manifests_op_types_reach_the_rule_and_the_default_leaves_conv_out():
    from workspaces import make_plan

    def quantize_step(change=lambda d: None):
        return next(s for s in make_plan(change).steps if s.rule == "quantize_dynamic")

    assert quantize_step().params["op_types"] == ["Attention", "LSTM", "MatMul"]
    wider = quantize_step(lambda d: d["targets"]["onnx_int8"]["options"].__setitem__("op_types", ["Conv", "MatMul", "Conv"]))
    assert wider.params["op_types"] == ["Conv", "MatMul"]


@pytest.mark.parametrize("options, message", [
    ({"quantization": "static", "op_types": ["Conv"]}, "targets.onnx_int8.options.op_types: ['Conv'] is not allowed; expected no op_types with quantization = \"static\""),
    ({"op_types": ["Gemm"]}, "targets.onnx_int8.options.op_types[0]: 'Gemm' is not allowed; expected 'MatMul', 'Conv', 'LSTM' or 'Attention'"),
    ({"op_types": []}, "targets.onnx_int8.options.op_types: [] is not allowed"),
])
def test_op_types_the_quantizer_cannot_use_are_manifest_errors(options, message):
    from kiln.errors import ManifestError
    from workspaces import make_plan

    with pytest.raises(ManifestError) as err:
        make_plan(lambda d: d["targets"]["onnx_int8"].__setitem__("options", options))
    assert message in str(err.value) and "\n" not in str(err.value)
