"""scan_layers: every weight layer measured alone, as validation measures, and the model left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from budget_models import BUDGET, reference, sensitive_model
from kiln.errors import StepError
from kiln.rules import RunContext, get_rule
from kiln.runtime.onnx_graph import layers_to_quantize, load

pytest.importorskip("onnxruntime")


def scan(tmp_path: Path, **params) -> dict:
    model = sensitive_model(tmp_path)
    rule = get_rule("scan_layers")
    out = tmp_path / "sensitivity.json"
    facts = rule().run({"model": [model], "reference": [reference(tmp_path, model)]}, {"sensitivity": out},
                       rule.Params(**BUDGET | params), RunContext(tmp_path, "test/scan_layers"))
    return json.loads(out.read_text()) | {"facts": facts}


@pytest.mark.parametrize("quantization", ["dynamic", "int4"])
def test_every_weight_layer_is_scanned_alone_and_the_outlier_layer_hurts_most(tmp_path, quantization):
    result = scan(tmp_path, quantization=quantization)
    assert [layer["node"] for layer in result["layers"]] == ["fc1", "fc2", "fc2_again", "fc3"]
    alone = {layer["node"]: layer["alone"] for layer in result["layers"]}
    assert all(-1.0 <= a["min_cosine"] < 1.0 and a["max_abs_diff"] > 0 for a in alone.values())  # each one really quantized
    assert result["samples"] == 15 and result["quantization"] == quantization
    if quantization == "int4":  # a block holding the 100x column loses the others' precision
        assert min(alone, key=lambda n: alone[n]["min_cosine"]) == "fc1"


def test_excluded_nodes_are_not_scanned_and_the_slice_is_respected(tmp_path):
    result = scan(tmp_path, quantization="dynamic", exclude_nodes=["fc2"], max_samples=5)
    assert [layer["node"] for layer in result["layers"]] == ["fc1", "fc2_again", "fc3"]
    assert result["samples"] == 5


def test_the_model_is_restored_after_each_layer(tmp_path):
    from kiln.build_rules.scan_layers import ScanLayersParams, _quantized_alone
    from kiln.runtime.onnxrt import SharedWeights

    model = load(sensitive_model(tmp_path))
    layers = layers_to_quantize(model, [], "test")
    shared = SharedWeights(model)
    before = model.SerializeToString()
    for layer in layers:
        with _quantized_alone(model, layer, ScanLayersParams(quantization="int4", **BUDGET), None, shared):
            assert model.SerializeToString() != before
    assert model.SerializeToString() == before


@pytest.mark.parametrize("quantization", ["dynamic", "int4"])
def test_sessions_sharing_the_weights_give_the_whole_models_outputs_bit_for_bit(tmp_path, quantization):
    """The scan hands onnxruntime the weights as external initializers instead of serializing the
    model per layer: the outputs must be those of a session of the whole variant."""
    from kiln.build_rules.scan_layers import ScanLayersParams, _quantized_alone
    from kiln.runtime.onnxrt import SharedWeights, session

    whole = load(sensitive_model(tmp_path))
    slim = load(sensitive_model(tmp_path))
    layers, slim_layers = layers_to_quantize(whole, [], "test"), layers_to_quantize(slim, [], "test")
    shared = SharedWeights(slim)
    assert shared.arrays and slim.ByteSize() < whole.ByteSize() // 4
    params = ScanLayersParams(quantization=quantization, **BUDGET)
    feed = {i.name: np.random.default_rng(0).standard_normal([d.dim_value or 3 for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in whole.graph.input}
    for layer, slim_layer in zip(layers, slim_layers):
        with _quantized_alone(whole, layer, params, None, SharedWeights(onnx.ModelProto())), _quantized_alone(slim, slim_layer, params, None, shared):
            want = session(whole.SerializeToString(), threads=2).run(None, feed)
            got = session(slim.SerializeToString(), threads=2, external=shared.used_by(slim)).run(None, feed)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(want, got)), layer.node.name


def test_static_needs_the_models_own_calibration(tmp_path):
    from kiln.native.calibration import Calibration

    other = tmp_path / "calibration.json"
    other.write_text(Calibration(16).to_json())
    model = sensitive_model(tmp_path)
    rule = get_rule("scan_layers")
    with pytest.raises(StepError, match="calibration has no range for"):
        rule().run({"model": [model], "reference": [reference(tmp_path, model)], "calibration": [other]}, {"sensitivity": tmp_path / "s.json"},
                   rule.Params(quantization="static", **BUDGET), RunContext(tmp_path, "test/scan_layers"))
