"""quantize_static: onnxruntime's QDQ quantizer writes the graph, with exactly the ranges kiln's
calibration gives for the target's method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from kiln.errors import StepError
from kiln.runtime.onnxrt import session
from kiln.native.calibration import Calibration
from kiln.rules import RunContext, get_rule
from test_calibrate import calibrate


def quantize(tmp_path: Path, name: str = "q8.onnx", calibration: Path | None = None, **params) -> tuple[Path, dict]:
    calibration = calibration or tmp_path / "calibration.json"
    if not calibration.exists():
        calibrate(tmp_path, calibration.name)
    rule = get_rule("quantize_static")
    out = tmp_path / name
    facts = rule().run({"model": [tmp_path / "fp32.onnx"], "calibration": [calibration]}, {"model": out}, rule.Params(**params), RunContext(tmp_path, "test/quantize_static"))
    return out, facts


def activation_scales(path: Path) -> dict[str, tuple[float, int]]:
    """tensor -> (scale, zero point) of the QuantizeLinear on each quantized activation."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: (float(inits[n.input[1]]), int(inits[n.input[2]])) for n in model.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_activation_quantizers_use_kilns_ranges(tmp_path, method):
    out, facts = quantize(tmp_path, method=method, percentile=99.9)
    cal = Calibration.from_json((tmp_path / "calibration.json").read_text())
    scales = activation_scales(out)
    assert sorted(scales) == ["m2", "mixed2", "r3", "x2"] and facts["quantized_layers"] == 4
    for name, (scale, zero_point) in scales.items():
        obs = cal[name]
        t = {"minmax": max(-obs.min, obs.max), "percentile": obs.percentile(99.9), "entropy": obs.entropy()}[method]
        lo, hi = min(max(obs.min, -t), 0.0), max(min(obs.max, t), 0.0)  # uint8 ranges always hold 0
        assert scale == pytest.approx((hi - lo) / 255, rel=1e-6), name
        assert abs(zero_point + lo / scale) <= 0.5 + 1e-4, name  # round(-lo / scale), ties either way


def test_weights_are_per_channel_int8_and_the_model_stays_close(tmp_path):
    out, _ = quantize(tmp_path)
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None and inits[n.input[0]].dtype == np.int8]
    assert len(weight_dq) == 3 and all(inits[n.input[1]].size > 1 for n in weight_dq)  # W1, W2 (shared), W3: one scale per channel
    x = np.load(tmp_path / "calib.npz")["X"]
    (got,) = session(out).run(["Y"], {"X": x})
    (want,) = session(tmp_path / "fp32.onnx").run(["Y"], {"X": x})
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.mean() > 0.99


def test_excluded_layers_stay_fp32_and_bytes_are_reproducible(tmp_path):
    a, _ = quantize(tmp_path, "a.onnx", exclude_nodes=["fc1"])
    b, _ = quantize(tmp_path, "b.onnx", exclude_nodes=["fc1"])
    assert a.read_bytes() == b.read_bytes()
    assert "x2" not in activation_scales(a) and "r3" in activation_scales(a)


def test_unknown_node_and_foreign_calibration_are_refused(tmp_path):
    with pytest.raises(StepError, match="'nope' is not a node of the model"):
        quantize(tmp_path, exclude_nodes=["nope"])
    foreign = tmp_path / "foreign.json"
    foreign.write_text(Calibration(256).to_json())
    with pytest.raises(StepError, match=r"the calibration has no range for 'm2' \(4 tensors\): it was made for another model"):
        quantize(tmp_path, calibration=foreign)


def test_the_qdq_model_passes_the_full_checker_and_counts_its_quantizers(tmp_path):
    out, facts = quantize(tmp_path)
    onnx.checker.check_model(str(out), full_check=True)
    # 4 activations (Q + DQ each); DQs of 3 int8 weights (W2 is shared) and of the 2 Gemm biases (int32)
    assert facts["quantized_ops"] == {"DequantizeLinear": 9, "QuantizeLinear": 4}


def test_excluding_every_layer_fails_instead_of_publishing_fp32(tmp_path):
    with pytest.raises(StepError, match=r"static int8 has no weight layer to quantize with op_types \['MatMul', 'Gemm'\]; the graph's ops with weights: "
                       r"Gemm: 2, MatMul: 2: options.exclude_nodes \(4 nodes\) leaves none of them"):
        quantize(tmp_path, exclude_nodes=["fc1", "fc2", "fc2_again", "fc3"])
