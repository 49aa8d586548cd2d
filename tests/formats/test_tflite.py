"""format = "tflite": the target table's checks (one line each), and the LiteRT runner validate uses:
inputs by name with the batch resized per feed, int8 inputs quantized and outputs dequantized with
each tensor's scale and zero point, and the files it must refuse (damaged, Flex ops, another
precision than the target's, an output the model lacks)."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import numpy as np
import pytest

from keras_workspaces import CONVNET_MANIFEST, FLEX_MANIFEST, keras_workspace, targets
from kiln.define.spec import validate
from kiln.errors import ManifestError, StepError
from kiln.formats.tflite import Tflite, dequantize, flex_ops, int8_activations, quantize
from kiln.runtime.runners import Artifact
from kiln.schema.manifest import RawManifest

STEP = "m/t/validate"
CONVNET = tomllib.loads(CONVNET_MANIFEST.format(name="conv", source='factory = "kmodels:convnet"', targets=targets(lite='format = "tflite"')))
IMAGE = [{"name": "image", "dtype": "float32", "shape": ["batch", 16, 16, 3]}]
OUTPUTS = [{"name": "logits", "dtype": "float32", "shape": ["batch", 5]}, {"name": "aux", "dtype": "float32", "shape": ["batch", 2]}]


# ---- the target table -----------------------------------------------------------------------------


@pytest.mark.parametrize("target,key,text", [
    ({"precision": "int4"}, "targets.lite.precision", "'int4' is not allowed; expected 'fp32', 'fp16' or 'int8'"),
    ({"precision": "fp16", "options": {"quantization": "static"}}, "targets.lite.options.quantization", "no quantization for precision = \"fp16\" (it applies to precision = \"int8\" only)"),
    ({"precision": "int8", "options": {"integer_io": False}}, "targets.lite.options.integer_io", "no integer_io with quantization = \"dynamic\""),
    ({"precision": "int8", "options": {"calibration": "minmax"}}, "targets.lite.options.calibration", "no calibration with quantization = \"dynamic\""),
    ({"precision": "int8", "options": {"quantization": "static", "calibration": "minmax", "percentile": 99.9}}, "targets.lite.options.percentile",
     "no percentile with calibration = \"minmax\""),
    ({"precision": "int8", "options": {"quantization": "static", "calibration": "max"}}, "targets.lite.options.calibration", "'max' is not allowed"),
    ({"precision": "int8", "opset": 17}, "targets.lite.opset", "unknown key"),
])
def test_bad_tflite_targets_name_the_key(target, key, text):
    data = copy.deepcopy(CONVNET)
    data["targets"]["lite"] |= target
    with pytest.raises(ManifestError) as caught:
        validate(RawManifest(Path("/ws/manifests/conv.toml"), data))
    assert f"conv.toml: {key}: " in str(caught.value) and text in str(caught.value)


def test_static_int8_needs_a_calibration_table():
    data = copy.deepcopy(CONVNET)
    data["targets"]["lite"] |= {"precision": "int8", "options": {"quantization": "static"}}
    validate(RawManifest(Path("/ws/manifests/conv.toml"), data))
    del data["calibration"]
    with pytest.raises(ManifestError, match=r"targets.lite.options.quantization: 'static' is not allowed; expected a \[calibration\] table"):
        validate(RawManifest(Path("/ws/manifests/conv.toml"), data))


# ---- the runner ---------------------------------------------------------------------------------------


def _convert(ws, factory: str, inputs: list[dict], outputs: list[dict], setup=lambda converter, tf: None) -> bytes:
    """The factory's model converted in this process (the rule converts in a child, for its bytes only)."""
    from kiln.sources.tensorflow import export_serving, import_tensorflow

    tf = import_tensorflow()
    folder = ws.root / f"saved_{factory}_{len(list(ws.root.iterdir()))}"
    export_serving({"kind": "tensorflow", "factory": f"kmodels:{factory}"}, [ws.root / "kmodels.py"], inputs, outputs, ws.root, folder)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(folder))
    setup(converter, tf)
    return converter.convert()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """fp32, fp16, full-integer int8 and dynamic-range int8 .tflite files of the convnet, and the convnet's own outputs."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("ai_edge_litert")
    ws = keras_workspace(tmp_path_factory.mktemp("lite") / "ws", {"flex": FLEX_MANIFEST})
    x = np.random.default_rng(0).standard_normal((6, 16, 16, 3)).astype(np.float32)

    def fp16(converter, tf):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]

    def int8(converter, tf):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ({"image": x[i:i + 2]} for i in range(0, 6, 2))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.int8

    files = {}
    def dynamic(converter, tf):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]

    for name, setup in (("fp32", lambda c, tf: None), ("fp16", fp16), ("int8", int8), ("dynamic", dynamic)):
        files[name] = ws.root / f"{name}.tflite"
        files[name].write_bytes(_convert(ws, "convnet", IMAGE, OUTPUTS, setup))
    import importlib.util

    spec = importlib.util.spec_from_file_location("kmodels_lite", ws.root / "kmodels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    logits, aux = module.convnet()(x)
    return ws, files, x, {"logits": logits.numpy(), "aux": aux.numpy()}


def _runner(path: Path, precision: str, outputs=("logits", "aux")):
    return Tflite().open_runner(Artifact(path, list(outputs), STEP, precision=precision))


def test_the_runner_gives_the_declared_outputs_by_name_at_any_batch(models):
    _, files, x, expected = models
    run = _runner(files["fp32"], "fp32")
    for rows in (slice(0, 6), slice(0, 1), slice(2, 5)):  # the batch is resized per feed
        got = run({"image": x[rows]})
        assert list(got) == ["logits", "aux"] and got["logits"].dtype == np.float32
        for name in got:
            np.testing.assert_allclose(got[name], expected[name][rows], atol=1e-5)


def test_fp16_weights_stay_within_fp16_rounding(models):
    _, files, x, expected = models
    got = _runner(files["fp16"], "fp16")({"image": x})
    np.testing.assert_allclose(got["logits"], expected["logits"], atol=5e-3)


def test_a_full_integer_model_takes_quantized_inputs_and_gives_dequantized_outputs(models):
    _, files, x, expected = models
    got = _runner(files["int8"], "int8")({"image": x})
    assert got["logits"].dtype == np.float32
    scale = np.abs(expected["logits"]).max()
    assert np.abs(got["logits"] - expected["logits"]).max() < 0.1 * scale  # int8 steps, not garbage
    cosine = (got["logits"] * expected["logits"]).sum(1) / np.linalg.norm(got["logits"], axis=1) / np.linalg.norm(expected["logits"], axis=1)
    assert cosine.min() > 0.99


def test_quantize_and_dequantize_use_the_tensors_scale_and_zero_point():
    detail = {"dtype": np.int8, "quantization": (0.5, -3)}
    assert quantize(np.array([0.0, 1.0, -1.24, 100.0, -100.0], np.float32), detail).tolist() == [-3, -1, -5, 127, -128]
    assert dequantize(np.array([-3, -1, 127], np.int8), detail).tolist() == [0.0, 1.0, 65.0]
    plain = {"dtype": np.float32, "quantization": (0.0, 0)}
    assert quantize(np.array([1.5], np.float32), plain).tolist() == [1.5] and dequantize(np.array([1.5], np.float32), plain).tolist() == [1.5]


@pytest.mark.parametrize("file,precision,text", [
    ("fp32", "fp16", "holds no float16 tensor"),
    ("fp32", "int8", "holds no quantized tensor"),
    ("fp16", "fp32", "holds float16 or quantized tensors"),
    ("int8", "fp32", "holds float16 or quantized tensors"),
])
def test_a_file_at_another_precision_than_the_targets_is_refused(models, file, precision, text):
    _, files, _, _ = models
    with pytest.raises(StepError, match=text):
        _runner(files[file], precision)


def test_an_output_the_model_lacks_is_refused(models):
    _, files, _, _ = models
    with pytest.raises(StepError, match=r"output 'probabilities' is not in the TFLite model; it has \['aux', 'logits'\]"):
        _runner(files["fp32"], "fp32", ["logits", "probabilities"])


def test_a_damaged_file_is_a_step_error(models, tmp_path: Path):
    _, files, _, _ = models
    damaged = tmp_path / "model.tflite"
    damaged.write_bytes(files["fp32"].read_bytes()[:200])
    with pytest.raises(StepError, match="LiteRT cannot run model.tflite"):
        _runner(damaged, "fp32")


def test_a_model_with_flex_ops_never_passes(models, tmp_path: Path):
    ws, _, _, _ = models

    def select_tf_ops(converter, tf):  # what kiln's rule never allows: TensorFlow kernels through Flex
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]

    flex = tmp_path / "model.tflite"
    flex.write_bytes(_convert(ws, "flex", [{"name": "features", "dtype": "float32", "shape": ["batch", 4, 4]}],
                              [{"name": "y", "dtype": "float32", "shape": ["batch", 4, 4]}], select_tf_ops))
    with pytest.raises(StepError, match=r"model.tflite needs TensorFlow Flex ops \['FlexMatrixInverse'\], which the LiteRT runtime cannot run"):
        Tflite().open_runner(Artifact(flex, ["y"], STEP, precision="fp32"))


def test_a_tensor_named_like_a_flex_op_is_not_taken_for_one(models, tmp_path: Path):
    """A file LiteRT cannot run for another reason (a custom op it has no kernel for) whose bytes hold
    "FlexHead" (a layer's name): the error is LiteRT's own, not "needs Flex ops"."""
    ws, _, _, _ = models

    def custom_ops(converter, tf):
        converter.allow_custom_ops = True  # MatrixInverse written as a custom op, not a Flex one

    path = tmp_path / "model.tflite"
    path.write_bytes(_convert(ws, "flex_head", [{"name": "features", "dtype": "float32", "shape": ["batch", 4, 4]}],
                              [{"name": "y", "dtype": "float32", "shape": ["batch", 4, 4]}], custom_ops))
    assert b"FlexHead" in path.read_bytes()
    assert flex_ops(path.read_bytes()) == []
    with pytest.raises(StepError, match="LiteRT cannot run model.tflite") as caught:
        Tflite().open_runner(Artifact(path, ["y"], STEP, precision="fp32"))
    assert "Flex" not in str(caught.value).replace("FlexHead", "")


def test_flex_ops_are_read_from_the_operator_codes(models):
    _, files, _, _ = models
    assert flex_ops(files["fp32"].read_bytes()) == []  # builtin ops only
    assert flex_ops(b"FlexMatrixInverse, but no flatbuffer") == []


def test_a_static_target_needs_int8_activations_not_just_int8_weights(models):
    """Dynamic range holds int8 weights (quantized tensors) but computes in float: as a static target
    it must not pass; a full-integer file does."""
    ws, files, x, expected = models
    assert int8_activations(files["fp32"].read_bytes()) == 0 and int8_activations(files["dynamic"].read_bytes()) == 0
    assert int8_activations(files["int8"].read_bytes()) > 0
    static = {"quantization": "static"}
    Tflite().open_runner(Artifact(files["dynamic"], ["logits"], STEP, precision="int8"))  # as a dynamic target it is fine
    with pytest.raises(StepError, match=r"^m/t/validate: dynamic.tflite holds no int8 activation: a static \(full integer\) int8 target must compute in int8"):
        Tflite().open_runner(Artifact(files["dynamic"], ["logits"], STEP, precision="int8", options=static))
    run = Tflite().open_runner(Artifact(files["int8"], ["logits"], STEP, precision="int8", options=static))
    assert run({"image": x})["logits"].shape == (6, 5)


def test_static_targets_plan_calibration_once_from_the_fp32_conversion():
    """Both static targets read tflite_fp32's file and one calibrate_tflite step; their methods differ only in quantize_tflite."""
    from kiln.define.resolve import Resolved
    from kiln.plan.chains import plan

    data = copy.deepcopy(CONVNET)
    data["targets"] = {"lite": {"format": "tflite"},
                       "a": {"format": "tflite", "precision": "int8", "options": {"quantization": "static"}},
                       "b": {"format": "tflite", "precision": "int8", "options": {"quantization": "static", "calibration": "minmax", "integer_io": False}}}
    root, manifest = Path("/ws"), Path("/ws/manifests/conv.toml")
    resolved = Resolved((root / "kmodels.py",), root / "manifests/data/images.npz", root / "manifests/data/calibration.npz")
    steps = plan(validate(RawManifest(manifest, data)), resolved, manifest, root).steps
    by_rule = {rule: [s for s in steps if s.rule == rule] for rule in ("convert_tflite", "calibrate_tflite", "quantize_tflite")}
    assert [sorted(s.targets) for s in by_rule["convert_tflite"]] == [["a", "b", "lite"]] and by_rule["convert_tflite"][0].params["precision"] == "fp32"
    assert [sorted(s.targets) for s in by_rule["calibrate_tflite"]] == [["a", "b"]]
    assert sorted((s.params["method"], s.params["integer_io"]) for s in by_rule["quantize_tflite"]) == [("minmax", False), ("percentile", True)]
    validates = {s.targets[0]: s.params for s in steps if s.rule == "validate"}
    assert validates["a"]["format_options"] == {"quantization": "static"} and "format_options" not in validates["lite"]
