"""scan_layers: every weight layer measured alone, as validation measures, and the model left as it was."""

from __future__ import annotations

import json
from pathlib import Path

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

    model = load(sensitive_model(tmp_path))
    layers = layers_to_quantize(model, [], "test")
    before = model.SerializeToString()
    for layer in layers:
        with _quantized_alone(model, layer, ScanLayersParams(quantization="int4", **BUDGET), None):
            assert model.SerializeToString() != before
            onnx.checker.check_model(model)
    assert model.SerializeToString() == before


def test_static_needs_the_models_own_calibration(tmp_path):
    from kiln.native.calibration import Calibration

    other = tmp_path / "calibration.json"
    other.write_text(Calibration(16).to_json())
    model = sensitive_model(tmp_path)
    rule = get_rule("scan_layers")
    with pytest.raises(StepError, match="calibration has no range for"):
        rule().run({"model": [model], "reference": [reference(tmp_path, model)], "calibration": [other]}, {"sensitivity": tmp_path / "s.json"},
                   rule.Params(quantization="static", **BUDGET), RunContext(tmp_path, "test/scan_layers"))
