"""smooth_onnx: the smoothed fp32 model computes the same function, its int8 (dynamic, per-channel
weights) quantization loses less than the unsmoothed model's on activations with an outlier channel,
shared weights are left alone with the reason, and a calibration of another model fails the step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.errors import StepError
from kiln.runtime.onnxrt import session
from kiln.rules import RunContext, get_rule

K, H, N = 16, 32, 8
OUTLIER = 3  # the input channel ~100x larger than the others
INPUTS = [{"name": "X", "dtype": "float32", "shape": ["batch", K]}]


def outlier_data(samples: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((samples, K)).astype(np.float32)
    x[:, OUTLIER] *= 100.0
    return x


def model(path: Path, shared: bool = False) -> Path:
    """X[batch, K] -> MatMul(W1) + Gemm(W1t, b, transB) -> Relu -> MatMul(W2) -> Y, and S = X + C
    (a residual reading X beside the weight layers). shared: Relu(Gemm's output) -> MatMul(W2) -> Y2,
    so W2 is the weight of two activations' layers."""
    rng = np.random.default_rng(0)
    inits = {"W1": rng.standard_normal((K, H)) * 0.3, "W1t": rng.standard_normal((H, K)) * 0.3, "b": rng.standard_normal(H),
             "W2": rng.standard_normal((H, N)) * 0.3, "C": rng.standard_normal(K)}
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h1"], name="fc1"),
        helper.make_node("Gemm", ["X", "W1t", "b"], ["h2"], name="fc1t", transB=1),
        helper.make_node("Add", ["h1", "h2"], ["h"], name="sum"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["Y"], name="fc2"),
        helper.make_node("Add", ["X", "C"], ["S"], name="residual"),
    ]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", N]), helper.make_tensor_value_info("S", TensorProto.FLOAT, ["batch", K])]
    if shared:
        nodes += [helper.make_node("Relu", ["h2"], ["r2"], name="relu2"), helper.make_node("MatMul", ["r2", "W2"], ["Y2"], name="fc2_shared")]
        outputs.append(helper.make_tensor_value_info("Y2", TensorProto.FLOAT, ["batch", N]))
    graph = helper.make_graph(nodes, "smooth", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", K])], outputs,
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return path


def channels(tmp_path: Path, source: Path) -> Path:
    """channels.json from the calibrate rule on outlier data."""
    rule = get_rule("calibrate")
    np.savez(tmp_path / "calib.npz", X=outlier_data(64, seed=1))
    out = {"calibration": tmp_path / "calibration.json", "channels": tmp_path / "channels.json"}
    rule().run({"model": [source], "data": [tmp_path / "calib.npz"]}, out, rule.Params(inputs=INPUTS, batch_size=16, max_length=16), RunContext(tmp_path, "test/calibrate"))
    return out["channels"]


def smooth(tmp_path: Path, source: Path, channels_json: Path, name: str = "smoothed.onnx", **params) -> tuple[Path, dict]:
    rule = get_rule("smooth_onnx")
    out = {"model": tmp_path / name, "data": tmp_path / f"{name}.data"}
    facts = rule().run({"model": [source], "channels": [channels_json]}, out, rule.Params(**params), RunContext(tmp_path, "test/smooth_onnx"))
    return out["model"], facts


def run(path: Path, x: np.ndarray, names=("Y", "S")) -> list[np.ndarray]:
    return session(path, optimize=False).run(list(names), {"X": x})


def test_the_smoothed_model_computes_the_same_function_and_keeps_the_residual_on_x(tmp_path):
    source = model(tmp_path / "fp32.onnx")
    out, facts = smooth(tmp_path, source, channels(tmp_path, source))
    assert (facts["smoothed"], facts["layers"], facts["skipped"]) == (2, 3, {})  # X (fc1, fc1t) and r (fc2)
    low, high = facts["scale_range"]
    assert low < high and high > 5  # the outlier channel's scale
    x = outlier_data(32, seed=5)
    (y0, s0), (y1, s1) = run(source, x), run(out, x)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5 * np.abs(y0).max())
    assert np.array_equal(s1, s0)
    graph = onnx.load(str(out)).graph
    reads = {node.name: list(node.input) for node in graph.node}
    muls = [node for node in graph.node if node.op_type == "Mul"]
    assert len(muls) == 2 and muls[0].input[0] == "X" and graph.node[0].name == muls[0].name  # X is a graph input: first
    assert reads["fc1"][0] == reads["fc1t"][0] == muls[0].output[0]  # one Mul for the whole group
    assert reads["residual"][0] == "X"  # the other reader keeps the original tensor


def test_smoothing_makes_dynamic_int8_more_accurate_on_an_outlier_channel(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = model(tmp_path / "fp32.onnx")
    smoothed, _ = smooth(tmp_path, source, channels(tmp_path, source))
    x = outlier_data(256, seed=7)
    (want,) = run(source, x, ["Y"])
    errors = []
    for fp32 in (source, smoothed):
        q = tmp_path / f"int8_{fp32.name}"
        quantize_dynamic(str(fp32), str(q), per_channel=True, weight_type=QuantType.QInt8)
        assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in onnx.load(str(q)).graph.node)
        (got,) = run(q, x, ["Y"])
        errors.append(np.linalg.norm(got - want) / np.linalg.norm(want))
    unsmoothed, with_smoothing = errors
    assert with_smoothing < 0.5 * unsmoothed, errors


def test_a_weight_shared_by_two_activations_is_skipped_with_the_reason(tmp_path):
    source = model(tmp_path / "fp32.onnx", shared=True)
    out, facts = smooth(tmp_path, source, channels(tmp_path, source))
    assert facts["smoothed"] == 1 and sorted(facts["skipped"]) == ["r", "r2"]
    assert "'W2' is shared with the weight layer of activation 'r2'" in facts["skipped"]["r"]
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert np.array_equal(weights["W2"], numpy_helper.to_array({t.name: t for t in onnx.load(str(source)).graph.initializer}["W2"]))
    x = outlier_data(8, seed=5)
    for got, want in zip(run(out, x, ["Y", "Y2"]), run(source, x, ["Y", "Y2"]), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("maxima", [{"other": [1.0] * K}, {"X": [1.0] * (K - 1), "r": [1.0] * (H + 1)}], ids=["missing", "wrong_length"])
def test_a_calibration_of_another_model_fails_in_one_line(tmp_path, maxima):
    source = model(tmp_path / "fp32.onnx")
    (tmp_path / "channels.json").write_text(json.dumps(maxima))
    with pytest.raises(StepError, match=r"channels\.json: the calibration has no channel maxima for the 2 activations .*: it was made for another model") as err:
        smooth(tmp_path, source, tmp_path / "channels.json")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "smoothed.onnx").exists()


def test_same_inputs_give_the_same_bytes_with_external_data(tmp_path):
    source = model(tmp_path / "fp32.onnx")
    found = channels(tmp_path, source)
    runs = []
    for folder in ("a", "b"):  # the same file names: the model names its data file
        (tmp_path / folder).mkdir()
        path, _ = smooth(tmp_path / folder, source, found, external_data=True, alpha=0.8)
        runs.append((path.read_bytes(), (tmp_path / folder / "smoothed.onnx.data").read_bytes()))
    assert runs[0] == runs[1]
    assert len(runs[0][1]) > 0  # the weights went to the data file
