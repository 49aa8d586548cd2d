"""convert_tflite and export_onnx_tf through real builds of tiny Keras models: a conv net from a factory
gives onnx fp32 and tflite fp32 / fp16 / int8 dynamic / int8 static (the fp32 file calibrated by
kiln and quantized by quantize_tflite), validated against TensorFlow;
a dense model from a .keras file and from a SavedModel folder gives onnx and tflite; both conversions
are byte-reproducible; a gate that cannot be met, a model needing Flex ops and an int8 target that
quantizes nothing fail without publishing; a torch-only target from a tensorflow source fails the
manifest in one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import Workspace
from keras_workspaces import CONVNET_MANIFEST, DENSE_MANIFEST, FLEX_MANIFEST, PAIR_MANIFEST, keras_workspace, save_keras_model, targets
from kiln.rules import RunContext

pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")
pytest.importorskip("tf2onnx")

CONVNET_TARGETS = targets(
    onnx_fp32='format = "onnx"',
    tflite_fp32='format = "tflite"',
    tflite_fp16='format = "tflite"\nprecision = "fp16"',
    tflite_int8='format = "tflite"\nprecision = "int8"',
    tflite_int8_static='format = "tflite"\nprecision = "int8"\noptions = { quantization = "static" }',
    savedmodel='format = "savedmodel"',
)
TFLITE = ("tflite_fp32", "tflite_fp16", "tflite_int8", "tflite_int8_static")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built_conv(tmp_path_factory) -> Workspace:
    ws = keras_workspace(tmp_path_factory.mktemp("conv") / "ws", {"conv": CONVNET_MANIFEST.format(name="conv", source='factory = "kmodels:convnet"', targets=CONVNET_TARGETS)})
    ws.doit("build")
    return ws


@pytest.mark.slow
def test_a_keras_factory_builds_onnx_and_every_tflite_precision_validated(built_conv):
    report = built_conv.report("conv")
    assert report["ok"]
    artifacts = {a["target"]: a for a in report["artifacts"]}
    assert sorted(artifacts) == sorted(["onnx_fp32", "savedmodel", *TFLITE]) and all(a["passed"] for a in artifacts.values())
    assert artifacts["savedmodel"]["metrics"]["logits"]["max_abs_diff"] < 1e-6
    assert artifacts["tflite_fp32"]["metrics"]["logits"]["max_abs_diff"] < 1e-5 and artifacts["tflite_fp32"]["metrics"]["logits"]["rows"] == 24
    assert artifacts["tflite_fp16"]["metrics"]["logits"]["min_cosine"] > 0.9999
    for name in ("tflite_int8", "tflite_int8_static"):  # the int8 gates (0.9 / 0.98) are far below what int8 gives here
        assert artifacts[name]["metrics"]["logits"]["min_cosine"] > 0.999 and artifacts[name]["thresholds"] == {"min_cosine": 0.9, "mean_cosine": 0.98}
    rules = [s["rule"] for s in report["steps"]]
    assert rules.count("reference_outputs") == 1 and rules.count("convert_tflite") == 3 and rules.count("export_onnx_tf") == 1 and rules.count("export_savedmodel") == 1
    assert rules.count("calibrate_tflite") == 1 and rules.count("quantize_tflite") == 1  # static int8 starts from tflite_fp32's file
    sizes = {name: artifacts[name]["bytes"] for name in TFLITE}
    assert sizes["tflite_fp16"] < sizes["tflite_fp32"] and sizes["tflite_int8"] < sizes["tflite_fp16"]
    assert [line for line in built_conv.doit("build").stdout.splitlines() if line.startswith(".  ")] == []  # nothing reruns


@pytest.mark.slow
def test_the_convert_facts_give_the_layout_and_the_int8_io_quantization(built_conv):
    steps = {s["step"]: s for s in built_conv.report("conv")["steps"]}
    static = steps["conv/tflite_int8_static/quantize_tflite"]["info"]
    assert static["inputs"]["image"]["dtype"] == "int8" and static["inputs"]["image"]["shape"] == [-1, 16, 16, 3]  # NHWC, batch dynamic
    assert static["inputs"]["image"]["scale"] > 0 and static["outputs"]["logits"]["dtype"] == "int8"
    assert static["int8_activations"] > 0 and steps["conv/tflite_fp32+tflite_int8_static/convert_tflite"]["info"]["layout"].startswith("the source's")
    assert steps["conv/tflite_fp16/convert_tflite"]["info"]["tensor_dtypes"]["float16"] > 0
    assert steps["conv/tflite_int8/convert_tflite"]["info"]["inputs"]["image"] == {"dtype": "float32", "shape": [-1, 16, 16, 3]}


@pytest.mark.slow
def test_the_published_files_run_in_their_runtimes_under_the_manifest_names(built_conv):
    import onnxruntime
    from ai_edge_litert.interpreter import Interpreter

    build = built_conv.root / "build/conv"
    interpreter = Interpreter(model_path=str(build / "tflite_fp32/model.tflite"))
    assert interpreter.get_signature_list() == {"serving_default": {"inputs": ["image"], "outputs": ["aux", "logits"]}}
    session = onnxruntime.InferenceSession(str(build / "onnx_fp32/model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["logits", "aux"]
    x = np.random.default_rng(9).standard_normal((3, 16, 16, 3)).astype(np.float32)
    lite = interpreter.get_signature_runner()(image=x)
    np.testing.assert_allclose(session.run(["logits"], {"image": x})[0], lite["logits"], atol=1e-5)


@pytest.mark.slow
def test_both_conversions_are_byte_reproducible(built_conv, tmp_path: Path):
    """The rules run again, in fresh children, write the bytes the build published."""
    from kiln.build_rules.convert_tflite import ConvertTflite, ConvertTfliteParams
    from kiln.build_rules.export_onnx_tf import ExportOnnxTf, ExportOnnxTfParams

    steps = {s["step"]: s for s in built_conv.report("conv")["steps"]}
    root = built_conv.root
    source = {"kind": "tensorflow", "factory": "kmodels:convnet", "path": None}
    tensors = {"inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 16, 16, 3], "range": None}],
               "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 5], "range": None},
                           {"name": "aux", "dtype": "float32", "shape": ["batch", 2], "range": None}]}
    params = ConvertTfliteParams(source=source, precision="fp32", **tensors)
    ConvertTflite().run({"source": [root / "kmodels.py"]}, {"model": tmp_path / "model.tflite"}, params, RunContext(root, "again"))
    assert sha256(tmp_path / "model.tflite") == sha256(root / "build/conv/tflite_fp32/model.tflite")
    ExportOnnxTf().run({"source": [root / "kmodels.py"]}, {"model": tmp_path / "model.onnx"}, ExportOnnxTfParams(source=source, opset=17, **tensors), RunContext(root, "again"))
    assert sha256(tmp_path / "model.onnx") == sha256(root / steps["conv/onnx_fp32/export_onnx_tf"]["outputs"][0]["path"])


@pytest.mark.slow
def test_the_savedmodel_is_a_published_folder_loadable_by_name_and_reproducible(built_conv, tmp_path: Path):
    import tensorflow as tf

    from kiln.build_rules.export_savedmodel import ExportSavedmodel, ExportSavedmodelParams

    folder = built_conv.root / "build/conv/savedmodel/model.savedmodel"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["saved_model.pb", "variables/variables.data-00000-of-00001", "variables/variables.index"]  # no fingerprint.pb
    signature = tf.saved_model.load(str(folder)).signatures["serving_default"]
    assert sorted(signature.structured_input_signature[1]) == ["image"] and sorted(signature.structured_outputs) == ["aux", "logits"]
    source = {"kind": "tensorflow", "factory": "kmodels:convnet", "path": None}
    params = ExportSavedmodelParams(source=source, inputs=[{"name": "image", "dtype": "float32", "shape": ["batch", 16, 16, 3], "range": None}],
                                    outputs=[{"name": "logits", "dtype": "float32", "shape": ["batch", 5], "range": None},
                                             {"name": "aux", "dtype": "float32", "shape": ["batch", 2], "range": None}])
    ExportSavedmodel().run({"source": [built_conv.root / "kmodels.py"]}, {"model": tmp_path / "again"}, params, RunContext(built_conv.root, "again"))
    for name in files:
        assert sha256(tmp_path / "again" / name) == sha256(folder / name), name


@pytest.mark.slow
def test_the_savedmodel_runner_refuses_a_damaged_folder_and_a_missing_output(built_conv, tmp_path: Path):
    from kiln.errors import StepError
    from kiln.formats.savedmodel import Savedmodel
    from kiln.runtime.runners import Artifact

    folder = built_conv.root / "build/conv/savedmodel/model.savedmodel"
    with pytest.raises(StepError, match=r"output 'probabilities' is not in the SavedModel model; it has \['aux', 'logits'\]"):
        Savedmodel().open_runner(Artifact(folder, ["logits", "probabilities"], "m/t/validate"))
    damaged = tmp_path / "model.savedmodel"
    shutil.copytree(folder, damaged)
    (damaged / "saved_model.pb").write_bytes((folder / "saved_model.pb").read_bytes()[:300])
    with pytest.raises(StepError, match="tf.saved_model.load cannot load model.savedmodel"):
        Savedmodel().open_runner(Artifact(damaged, ["logits"], "m/t/validate"))


@pytest.mark.slow
def test_a_gate_the_artifact_cannot_meet_fails_and_publishes_nothing(built_conv, tmp_path: Path):
    shutil.copytree(built_conv.root, tmp_path / "ws", symlinks=True)
    ws = Workspace(tmp_path / "ws")
    before = {name: size for name, size in ws.files().items() if name.startswith("conv/") and "/" in name[5:]}
    ws.edit('options = { quantization = "static" }', 'options = { quantization = "static" }\nthresholds = { max_abs_diff = 0.0 }', name="conv")
    proc = ws.doit("build", check=False)
    assert proc.returncode == 1
    assert "conv/tflite_int8_static/validate: validation failed, artifact not published: " in proc.stdout + proc.stderr
    assert "max_abs_diff" in proc.stdout + proc.stderr
    changed = {step: status for step, status in ws.statuses("conv").items() if status not in ("up to date", "not run")}
    assert changed == {"conv/tflite_int8_static/validate": "failed"}  # the conversion was up to date: only the gate reran
    after = {name: size for name, size in ws.files().items() if name.startswith("conv/") and "/" in name[5:]}
    assert after == before  # the artifact published earlier is still there, unchanged; nothing new
    assert json.loads((ws.root / "build/conv/tflite_int8_static/validation.json").read_text())["passed"] is True


@pytest.fixture(scope="module")
def built_dense(tmp_path_factory) -> Workspace:
    """The dense model from a .keras file (dk) and from a SavedModel folder (ds), onnx and tflite each."""
    both = targets(onnx_fp32='format = "onnx"', tflite_fp32='format = "tflite"')
    ws = keras_workspace(tmp_path_factory.mktemp("dense") / "ws", {
        "dk": DENSE_MANIFEST.format(name="dk", source='path = "dense.keras"', targets=both),
        "ds": DENSE_MANIFEST.format(name="ds", source='path = "dense_sm"', targets=both)})
    save_keras_model(ws, "dense", ws.root / "manifests/dense.keras")
    save_keras_model(ws, "dense", ws.root / "manifests/dense_sm", saved_model=True)
    ws.doit("build")
    return ws


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dk", "ds"])
def test_a_keras_file_and_a_saved_model_build_onnx_and_tflite(built_dense, model: str):
    report = built_dense.report(model)
    assert report["ok"] and sorted(a["target"] for a in report["artifacts"]) == ["onnx_fp32", "tflite_fp32"]
    for artifact in report["artifacts"]:
        assert artifact["passed"] and artifact["metrics"]["scores"]["rows"] == 40 and artifact["metrics"]["scores"]["max_abs_diff"] < 1e-5


@pytest.mark.slow
def test_the_keras_file_and_the_saved_model_give_the_same_reference(built_dense):
    from kiln.native.safetensors import load_file

    def reference(model: str) -> dict:
        [step] = [s for s in built_dense.report(model)["steps"] if s["rule"] == "reference_outputs"]
        return load_file(str(built_dense.root / step["outputs"][0]["path"]))

    keras_file, saved_model = reference("dk"), reference("ds")
    assert sorted(keras_file) == sorted(saved_model)
    for key in keras_file:
        np.testing.assert_allclose(keras_file[key], saved_model[key], atol=1e-6)


@pytest.mark.slow
def test_a_flex_op_model_and_an_int8_target_that_quantizes_nothing_fail_naming_why(tmp_path: Path):
    small = DENSE_MANIFEST.format(name="small", source='factory = "kmodels:small"', targets=targets(int8='format = "tflite"\nprecision = "int8"'))
    ws = keras_workspace(tmp_path / "ws", {"flex": FLEX_MANIFEST, "small": small})
    flex, small = (ws.doit("build", f"manifest=manifests/{name}.toml", check=False) for name in ("flex", "small"))
    assert flex.returncode == small.returncode == 1
    assert ("flex/tflite/convert_tflite: source: the model needs TensorFlow ops without a LiteRT builtin kernel ['MatrixInverse']: "
            "they would run only through the Flex delegate (Select TF ops), which the LiteRT runtime does not have") in flex.stdout + flex.stderr
    assert "small/int8/convert_tflite: model.tflite: the converted model holds no quantized tensor" in small.stdout + small.stderr
    assert not (ws.root / "build/flex/tflite").exists() and not (ws.root / "build/small/int8").exists()


def test_a_torch_only_target_from_a_tensorflow_source_fails_the_manifest_in_one_line(tmp_path: Path):
    manifest = CONVNET_MANIFEST.format(name="conv", source='factory = "kmodels:convnet"', targets=targets(ts='format = "torchscript"'))
    ws = keras_workspace(tmp_path / "ws", {"conv": manifest})
    proc = ws.doit("build", check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "conv.toml" in line]
    # the list of formats grows as sources gain formats: what matters is the one line, the key and the reason
    assert len(lines) == 1 and lines[0].startswith(f"kiln: error: {ws.manifest('conv')}: targets.ts.format: 'torchscript' is not allowed; expected a format a tensorflow source can give (")
    assert "'tflite'" in lines[0] and lines[0].endswith("); torchscript needs a torch or huggingface source")
    assert not (ws.root / "build").exists()


@pytest.mark.slow
def test_inputs_and_outputs_in_another_order_than_the_models_build_matched_by_name(tmp_path: Path):
    """pair(): inputs a, b and outputs sum, diff; the manifest lists b, a and diff, sum, all of one
    shape. The reference and every artifact must be the model fed by name (diff = a - b), never by
    position (which would validate a wrong artifact against an equally wrong reference)."""
    import importlib.util

    import onnxruntime
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from kiln.native.safetensors import load_file

    manifest = PAIR_MANIFEST.format(name="pair", factory="pair", targets=targets(onnx='format = "onnx"', tflite='format = "tflite"', savedmodel='format = "savedmodel"'))
    ws = keras_workspace(tmp_path / "ws", {"pair": manifest})
    ws.doit("build")
    report = ws.report("pair")
    assert report["ok"] and sorted(a["target"] for a in report["artifacts"]) == ["onnx", "savedmodel", "tflite"]
    assert all(a["passed"] for a in report["artifacts"])

    spec = importlib.util.spec_from_file_location("kmodels_pair_build", ws.root / "kmodels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = np.load(ws.root / "manifests/data/pairs.npz")
    a, b = data["a"], data["b"]
    total, difference = (t.numpy() for t in module.pair()({"a": a, "b": b}))
    np.testing.assert_allclose(difference, a - b, rtol=1e-6)

    [step] = [s for s in report["steps"] if s["rule"] == "reference_outputs"]
    reference = load_file(str(ws.root / step["outputs"][0]["path"]))  # "<batch>/in/<input>", "<batch>/out/<output>"
    batches = sorted({key.split("/")[0] for key in reference})
    assert len(batches) == 2
    for batch in batches:
        fed = {name: reference[f"{batch}/in/{name}"] for name in ("a", "b")}
        expected_sum, expected_diff = (t.numpy() for t in module.pair()(fed))
        np.testing.assert_array_equal(reference[f"{batch}/out/diff"], expected_diff)
        np.testing.assert_array_equal(reference[f"{batch}/out/sum"], expected_sum)
        assert float(fed["a"].mean()) > 50  # the data's a (~100) went to the model's a

    build = ws.root / "build/pair"
    onnx = onnxruntime.InferenceSession(str(build / "onnx/model.onnx")).run(["diff", "sum"], {"a": a, "b": b})
    lite = Interpreter(model_path=str(build / "tflite/model.tflite")).get_signature_runner("serving_default")(a=a, b=b)
    saved = tf.saved_model.load(str(build / "savedmodel/model.savedmodel")).signatures["serving_default"](a=tf.constant(a), b=tf.constant(b))
    for diff, sum_ in ((onnx[0], onnx[1]), (lite["diff"], lite["sum"]), (saved["diff"].numpy(), saved["sum"].numpy())):
        np.testing.assert_allclose(diff, difference, atol=1e-4)
        np.testing.assert_allclose(sum_, total, atol=1e-4)


def test_a_mixed_precision_model_is_refused_as_an_fp32_savedmodel(tmp_path: Path):
    """The SavedModel would compute in float16 and be gated by fp32's thresholds against a reference
    computing in float16 too: refused in one line, nothing written."""
    from kiln.build_rules.export_savedmodel import ExportSavedmodel, ExportSavedmodelParams
    from kiln.errors import StepError

    ws = keras_workspace(tmp_path / "ws", {"d": DENSE_MANIFEST.format(name="d", source='factory = "kmodels:mixed"', targets="")})
    params = ExportSavedmodelParams(source={"kind": "tensorflow", "factory": "kmodels:mixed", "path": None},
                                    inputs=[{"name": "features", "dtype": "float32", "shape": ["batch", 6]}],
                                    outputs=[{"name": "scores", "dtype": "float32", "shape": ["batch", 3]}])
    with pytest.raises(StepError, match=r"layer 'half' computes in float16 \(dtype policy 'mixed_float16'\); a savedmodel target is fp32") as caught:
        ExportSavedmodel().run({"source": [ws.root / "kmodels.py"]}, {"model": tmp_path / "model.savedmodel"}, params, RunContext(ws.root, "m/sm/export_savedmodel"))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "model.savedmodel").exists()
