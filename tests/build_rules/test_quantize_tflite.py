"""Static (full-integer) int8 TFLite through kiln's own calibration, on a PyTorch source (the example
convnet, manifests/models/tinycnn.py, through litert-torch): two static targets share tflite_fp32's
conversion and one calibrate_tflite step; both pass validation against torch with int8 activations
(int8 or float I/O as integer_io says); changing a target's method reruns only its quantize step,
changing the calibration data reruns the calibration; a gate the file cannot meet fails and
publishes nothing; the quantize step is byte-reproducible, refuses a calibration made for another
model and a file with nothing quantized. The TensorFlow source's static target is built in
tests/build_rules/test_convert_tflite.py. The litert-torch conversion needs its tool environment: slow."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import Workspace, new_workspace
from kiln.errors import StepError
from kiln.rules import RunContext

pytest.importorskip("ai_edge_litert")
pytest.importorskip("ai_edge_quantizer")

MANIFEST = '''
[model]
name = "cnn"

[source]
kind = "torch"
factory = "models.tinycnn:build"

[[inputs]]
name = "image"
dtype = "float32"
shape = ["batch", 3, 32, 32]

[[outputs]]
name = "logits"
shape = ["batch", 10]

[targets.tflite_fp32]
format = "tflite"

[targets.static]
format = "tflite"
precision = "int8"
options = { quantization = "static" }

[targets.static_minmax]
format = "tflite"
precision = "int8"
options = { quantization = "static", calibration = "minmax", integer_io = false }

[validation]
data = "data/tinycnn.npz"
batch_size = 8

[calibration]
data = "data/tinycnn_calibration.npz"
batch_size = 8
'''


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def step_of(ws: Workspace, rule: str, target: str) -> dict:
    return next(s for s in ws.report("cnn")["steps"] if s["rule"] == rule and target in s["targets"])


def rerun(ws: Workspace) -> dict[str, str]:
    """The steps of the next build that did not stay up to date, by rule and status."""
    ws.doit("build", check=False)
    return {step: status for step, status in ws.statuses("cnn").items() if status not in ("up to date", "not run")}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Workspace:
    ws = new_workspace(tmp_path_factory.mktemp("cnn") / "ws", {"cnn": MANIFEST})
    ws.doit("build")
    return ws


def copy_of(built: Workspace, tmp_path: Path) -> Workspace:
    shutil.copytree(built.root, tmp_path / "ws", symlinks=True)
    return Workspace(tmp_path / "ws")


@pytest.mark.slow
def test_two_static_targets_share_the_fp32_conversion_and_one_calibration_and_pass(built):
    report = built.report("cnn")
    assert report["ok"]
    rules = [s["rule"] for s in report["steps"]]
    assert rules.count("convert_tflite_torch") == 1 and rules.count("calibrate_tflite") == 1 and rules.count("quantize_tflite") == 2
    assert sorted(step_of(built, "calibrate_tflite", "static")["targets"]) == ["static", "static_minmax"]
    artifacts = {a["target"]: a for a in report["artifacts"]}
    for name in ("static", "static_minmax"):
        metrics = artifacts[name]["metrics"]["logits"]
        assert artifacts[name]["passed"] and metrics["min_cosine"] > 0.999 and metrics["max_abs_diff"] < 0.05
        assert artifacts[name]["bytes"] < 0.6 * artifacts["tflite_fp32"]["bytes"]  # int8 weights
    facts = step_of(built, "quantize_tflite", "static")["info"]
    assert facts["int8_activations"] > 0 and facts["method"] == "percentile"
    assert facts["inputs"]["image"]["dtype"] == "int8" and facts["inputs"]["image"]["scale"] > 0 and facts["outputs"]["logits"]["dtype"] == "int8"
    float_io = step_of(built, "quantize_tflite", "static_minmax")["info"]
    assert float_io["inputs"]["image"]["dtype"] == "float32" and float_io["outputs"]["logits"]["dtype"] == "float32"
    assert float_io["int8_activations"] > 0 and float_io["method"] == "minmax"


@pytest.mark.slow
def test_the_method_reruns_only_quantize_and_the_data_reruns_calibration(built, tmp_path: Path):
    ws = copy_of(built, tmp_path)
    ws.edit('calibration = "minmax"', 'calibration = "entropy"', name="cnn")
    assert rerun(ws) == {"cnn/static_minmax/quantize_tflite": "ran", "cnn/static_minmax/validate": "ran"}
    calibration = ws.root / "manifests/data/tinycnn_calibration.npz"
    images = np.load(calibration)["image"]
    np.savez(calibration, image=images[::-1] * 1.5)  # other data, wider ranges
    changed = rerun(ws)
    assert changed["cnn/static+static_minmax/calibrate_tflite"] == "ran"
    assert {step for step in changed if step.endswith("/quantize_tflite")} == {"cnn/static/quantize_tflite", "cnn/static_minmax/quantize_tflite"}
    assert not any("convert_tflite_torch" in step or "reference" in step for step in changed)


@pytest.mark.slow
def test_a_gate_the_static_file_cannot_meet_fails_and_publishes_nothing(built, tmp_path: Path):
    ws = copy_of(built, tmp_path)
    before = ws.files()["cnn/static/model.tflite"]
    ws.edit('options = { quantization = "static" }', 'options = { quantization = "static" }\nthresholds = { max_abs_diff = 0.0 }', name="cnn")
    proc = ws.doit("build", check=False)
    assert proc.returncode == 1 and "cnn/static/validate: validation failed, artifact not published: " in proc.stdout + proc.stderr
    assert ws.statuses("cnn")["cnn/static/validate"] == "failed" and ws.files()["cnn/static/model.tflite"] == before


@pytest.mark.slow
def test_quantize_is_byte_reproducible_and_refuses_another_models_calibration_or_nothing_quantized(built, tmp_path: Path):
    from kiln.build_rules.quantize_tflite import QuantizeTflite, QuantizeTfliteParams
    from kiln.native.calibration import Calibration

    step = step_of(built, "quantize_tflite", "static")
    float_model = built.root / "build/cnn/tflite_fp32/model.tflite"
    calibration = built.root / step_of(built, "calibrate_tflite", "static")["outputs"][0]["path"]
    rule, params, ctx = QuantizeTflite(), QuantizeTfliteParams(), RunContext(built.root, "again")
    rule.run({"model": [float_model], "calibration": [calibration]}, {"model": tmp_path / "again.tflite"}, params, ctx)
    assert sha256(tmp_path / "again.tflite") == sha256(built.root / "build/cnn/static/model.tflite") == sha256(built.root / step["outputs"][0]["path"])

    other = Calibration.from_json(calibration.read_text())
    other.observers = {f"other/{name}": obs for name, obs in other.observers.items()}
    (tmp_path / "other.json").write_text(other.to_json())
    with pytest.raises(StepError, match=r"the calibration has no range for tensor '.+' \(\d+ tensors\): it was made for another model"):
        rule.run({"model": [float_model], "calibration": [tmp_path / "other.json"]}, {"model": tmp_path / "no.tflite"}, params, ctx)
    assert not (tmp_path / "no.tflite").exists()


def test_a_static_file_without_int8_activations_never_validates(monkeypatch, tmp_path: Path):
    """A quantizer that leaves every activation float (it supports none of the ops) must fail the step, not publish int8 weights as full integer."""
    from kiln.build_rules import quantize_tflite
    from kiln.build_rules.convert_tflite_torch import quantized

    fp32 = _float_model(tmp_path)
    calibration = _calibrate(fp32, tmp_path)
    monkeypatch.setattr(quantize_tflite, "_quantize", lambda content, *args: quantized(content, "int8"))  # dynamic range: int8 weights only
    with pytest.raises(StepError, match="static int8 quantized no activation"):
        quantize_tflite.QuantizeTflite().run({"model": [fp32], "calibration": [calibration]}, {"model": tmp_path / "q.tflite"},
                                             quantize_tflite.QuantizeTfliteParams(), RunContext(tmp_path, "q"))
    assert not (tmp_path / "q.tflite").exists()


def _float_model(tmp_path: Path) -> Path:
    """A float .tflite of a small conv net written by TF's converter (no tool environment needed)."""
    tf = pytest.importorskip("tensorflow")

    class Net(tf.Module):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.kernel = tf.constant(rng.standard_normal((3, 3, 3, 8)).astype(np.float32))
            self.dense = tf.constant(rng.standard_normal((8, 4)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="image")])
        def __call__(self, image):
            x = tf.nn.relu(tf.nn.conv2d(image, self.kernel, 1, "SAME"))
            return {"logits": tf.matmul(tf.reduce_mean(x, [1, 2]), self.dense)}

    net = Net()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([net.__call__.get_concrete_function()], net)
    path = tmp_path / "fp32.tflite"
    path.write_bytes(converter.convert())
    return path


def _calibrate(model: Path, tmp_path: Path) -> Path:
    from kiln.build_rules.calibrate_tflite import CalibrateTflite, CalibrateTfliteParams

    np.savez(tmp_path / "cal.npz", image=np.random.default_rng(1).standard_normal((4, 8, 8, 3)).astype(np.float32))
    params = CalibrateTfliteParams(inputs=[{"name": "image", "dtype": "float32", "shape": ["batch", 8, 8, 3]}], batch_size=2, max_length=128)
    out = tmp_path / "calibration.json"
    facts = CalibrateTflite().run({"model": [model], "data": [tmp_path / "cal.npz"]}, {"calibration": out}, params, RunContext(tmp_path, "c"))
    assert facts["samples"] == 4 and facts["tensors"] >= 3  # the input, the conv's output, the mean, the logits
    return out


def test_a_tensor_that_is_zero_on_all_calibration_data_fails_naming_it(tmp_path: Path):
    """A range of width 0 would give a scale of ~0, which LiteRT's kernels refuse at run time with a bare delegate error."""
    from kiln.build_rules.quantize_tflite import QuantizeTflite, QuantizeTfliteParams
    from kiln.native.calibration import Calibration, HistogramObserver

    fp32 = _float_model(tmp_path)
    calibration = Calibration.from_json(_calibrate(fp32, tmp_path).read_text())
    dead = sorted(calibration.observers)[-1]
    calibration.observers[dead] = HistogramObserver(2048).update(np.zeros((2, 4), np.float32))
    (tmp_path / "dead.json").write_text(calibration.to_json())
    with pytest.raises(StepError, match=rf"tensor '{dead}' \(1 tensors\) is 0 on all the calibration data"):
        QuantizeTflite().run({"model": [fp32], "calibration": [tmp_path / "dead.json"]}, {"model": tmp_path / "q.tflite"}, QuantizeTfliteParams(), RunContext(tmp_path, "q"))
