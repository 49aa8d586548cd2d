"""kiln.runtime.scan: every weight layer measured alone, as validation measures, the model left as it
was; and the memo that lets a second quantize step (other gates, same model and settings) skip it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "build_rules"))
from budget_models import BUDGET, calibration, reference, sensitive_model  # noqa: E402
from kiln.errors import StepError  # noqa: E402
from kiln.rules import RunContext  # noqa: E402
from kiln.runtime.onnx_graph import layers_to_quantize, load  # noqa: E402

pytest.importorskip("onnxruntime")


def hooks():
    from kiln.build_rules.quantize_int4 import scan_layer
    from kiln.build_rules.quantize_static import scan_ranges
    from kiln.runtime.scan import ScanHooks

    return ScanHooks(ranges=scan_ranges, int4_layer=scan_layer)


def settings(**values):
    from kiln.runtime.scan import ScanSettings

    return ScanSettings(**BUDGET | values)


def inputs_of(tmp_path: Path) -> dict:
    model = sensitive_model(tmp_path)
    return {"model": [model], "reference": [reference(tmp_path, model)]}


def scan(tmp_path: Path, **values) -> dict:
    from kiln.runtime.scan import scan as run_scan

    return run_scan(inputs_of(tmp_path), settings(**values), RunContext(tmp_path, "test/quantize"), hooks())


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
    from kiln.runtime.onnxrt import SharedWeights
    from kiln.runtime.scan import quantized_alone

    model = load(sensitive_model(tmp_path))
    layers = layers_to_quantize(model, [], "test")
    shared = SharedWeights(model)
    before = model.SerializeToString()
    for layer in layers:
        with quantized_alone(model, layer, settings(quantization="int4"), None, shared, hooks()):
            assert model.SerializeToString() != before
    assert model.SerializeToString() == before


@pytest.mark.parametrize("quantization", ["dynamic", "int4"])
def test_sessions_sharing_the_weights_give_the_whole_models_outputs_bit_for_bit(tmp_path, quantization):
    """The scan hands onnxruntime the weights as external initializers instead of serializing the
    model per layer: the outputs must be those of a session of the whole variant."""
    from kiln.runtime.onnxrt import SharedWeights, session
    from kiln.runtime.scan import quantized_alone

    whole = load(sensitive_model(tmp_path))
    slim = load(sensitive_model(tmp_path))
    layers, slim_layers = layers_to_quantize(whole, [], "test"), layers_to_quantize(slim, [], "test")
    shared = SharedWeights(slim)
    assert shared.arrays and slim.ByteSize() < whole.ByteSize() // 4
    values = settings(quantization=quantization)
    feed = {i.name: np.random.default_rng(0).standard_normal([d.dim_value or 3 for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in whole.graph.input}
    for layer, slim_layer in zip(layers, slim_layers):
        with quantized_alone(whole, layer, values, None, SharedWeights(onnx.ModelProto()), hooks()), quantized_alone(slim, slim_layer, values, None, shared, hooks()):
            want = session(whole.SerializeToString(), threads=2).run(None, feed)
            got = session(slim.SerializeToString(), threads=2, external=shared.used_by(slim)).run(None, feed)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(want, got)), layer.node.name


def test_static_needs_the_models_own_calibration(tmp_path):
    from kiln.native.calibration import Calibration
    from kiln.runtime.scan import scan as run_scan

    other = tmp_path / "calibration.json"
    other.write_text(Calibration(16).to_json())
    with pytest.raises(StepError, match="calibration has no range for"):
        run_scan(inputs_of(tmp_path) | {"calibration": [other]}, settings(quantization="static"), RunContext(tmp_path, "test/quantize"), hooks())


def test_a_static_scan_quantizes_each_activation_with_the_calibrated_range(tmp_path):
    from kiln.runtime.scan import scan as run_scan

    inputs = inputs_of(tmp_path)
    inputs["calibration"] = [calibration(tmp_path, inputs["model"][0], inputs["reference"][0])]
    result = run_scan(inputs, settings(quantization="static"), RunContext(tmp_path, "test/quantize"), hooks())
    assert [layer["node"] for layer in result["layers"]] == ["fc1", "fc2", "fc2_again", "fc3"]
    alone = {layer["node"]: layer["alone"] for layer in result["layers"]}
    assert all(-1.0 <= a["min_cosine"] < 1.0 and a["max_abs_diff"] > 0 for a in alone.values())
    # per-tensor ranges: the layers reading fc1's output, with its 100x column, lose the most
    assert sorted(alone, key=lambda n: alone[n]["min_cosine"])[:2] == ["fc2_again", "fc2"]


# ---------------------------------------------------------------- the memo


def test_the_scan_is_made_once_then_read_from_its_memo_and_a_corrupt_memo_is_rescanned(tmp_path, monkeypatch):
    from kiln.runtime import scan as module

    inputs = inputs_of(tmp_path)
    ctx = RunContext(tmp_path, "test/quantize")
    runs = []
    real = module.scan
    monkeypatch.setattr(module, "scan", lambda *a: runs.append(1) or real(*a))
    first = module.LazyScan(inputs, settings(quantization="dynamic"), ctx, hooks())
    assert first.facts() == {"ran": False, "why": "the all-quantized model passes the gates"}
    layers = first()
    assert first() is layers and len(runs) == 1  # asked twice, scanned once
    memos = list((tmp_path / "build/.kiln/scans").glob("*.json"))
    assert len(memos) == 1 and json.loads(memos[0].read_text())["layers"] == layers
    assert first.facts() | {"seconds": 0} == {"ran": True, "reused": False, "layers": 4, "samples": 15, "seconds": 0}

    again = module.LazyScan(inputs, settings(quantization="dynamic"), ctx, hooks())
    assert again() == layers and len(runs) == 1 and again.facts()["reused"] is True

    memos[0].write_text('{"format": 3, "layers": [')  # torn
    torn = module.LazyScan(inputs, settings(quantization="dynamic"), ctx, hooks())
    assert torn() == layers and len(runs) == 2 and torn.facts()["reused"] is False
    assert json.loads(memos[0].read_text())["layers"] == layers  # rewritten
    memos[0].write_text(json.dumps({"format": 3, "samples": 15, "layers": [{"node": "fc1"}]}))  # parses, but is no scan
    assert module.LazyScan(inputs, settings(quantization="dynamic"), ctx, hooks())() == layers and len(runs) == 3


def test_two_steps_needing_the_same_scan_at_once_make_it_once(tmp_path, monkeypatch):
    import threading
    import time

    from kiln.runtime import scan as module

    inputs = inputs_of(tmp_path)
    runs = []
    real = module.scan

    def slow_scan(*args):
        runs.append(1)
        time.sleep(0.3)  # long enough for the other step to arrive while this one scans
        return real(*args)

    monkeypatch.setattr(module, "scan", slow_scan)
    scans = [module.LazyScan(inputs, settings(quantization="dynamic"), RunContext(tmp_path, f"test/q{i}"), hooks()) for i in range(2)]
    threads = [threading.Thread(target=lazy) for lazy in scans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(runs) == 1 and sorted(lazy.facts()["reused"] for lazy in scans) == [False, True]
    assert scans[0].result == scans[1].result


def test_the_memo_key_follows_the_files_and_settings_but_not_the_gates(tmp_path):
    from kiln.runtime.scan import memo_key, settings_from

    inputs = inputs_of(tmp_path)
    fallback = BUDGET | {"goal": {"min_cosine": 0.99}, "scan": {"quantization": "dynamic", "max_samples": 64}}
    key = memo_key(inputs, settings_from(fallback, "t"), tmp_path)
    assert memo_key(inputs, settings_from(fallback | {"goal": {"min_cosine": 0.5}}, "t"), tmp_path) == key
    assert memo_key(inputs, settings_from(fallback | {"scan": {"quantization": "dynamic", "max_samples": 8}}, "t"), tmp_path) != key
    assert memo_key(inputs, settings_from(fallback | {"metrics": ["min_cosine"]}, "t"), tmp_path) != key
    (tmp_path / "other").mkdir()
    other = reference(tmp_path / "other", inputs["model"][0], batches=2)
    assert memo_key(inputs | {"reference": [other]}, settings_from(fallback, "t"), tmp_path) != key


def test_bad_scan_settings_name_the_key(tmp_path):
    from kiln.runtime.scan import settings_from

    with pytest.raises(StepError, match=r"params\.fallback\.scan\.quantization: Input should be 'dynamic', 'static' or 'int4'"):
        settings_from(BUDGET | {"goal": {}, "scan": {"quantization": "int2"}}, "t")
    with pytest.raises(StepError, match=r"params\.fallback\.scan is None"):
        settings_from(BUDGET | {"goal": {}}, "t")
