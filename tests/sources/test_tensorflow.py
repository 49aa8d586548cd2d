"""kind = "tensorflow": the [source] table and what it can give (one-line errors), its files (a .keras
file, a SavedModel folder listed, a factory's module), the extra it needs, how the model's outputs
meet the manifest's names, and the reference run in TensorFlow (factory, .keras, SavedModel)."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import numpy as np
import pytest

from keras_workspaces import CONVNET_MANIFEST, DENSE_MANIFEST, keras_workspace, save_keras_model, targets
from kiln.define.resolve import resolve
from kiln.define.spec import validate
from kiln.errors import ManifestError, StepError
from kiln.rules import RunContext
from kiln.schema.manifest import RawManifest, read_manifest
from kiln.sources.tensorflow import SAVED_MODEL_FILE, Tensorflow, named_outputs

CONVNET = tomllib.loads(CONVNET_MANIFEST.format(name="conv", source='factory = "kmodels:convnet"', targets=targets(tflite='format = "tflite"')))
STEP = "m/t/reference_outputs"


def _validate(change) -> None:
    data = copy.deepcopy(CONVNET)
    change(data)
    validate(RawManifest(Path("/ws/manifests/conv.toml"), data))


def _one_line_error(change) -> str:
    with pytest.raises(ManifestError) as caught:
        _validate(change)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---- the [source] table and the targets it can give ------------------------------------------


def test_a_keras_factory_manifest_with_onnx_openvino_and_tflite_targets_is_valid():
    def more(data):
        data["targets"] |= {"onnx": {"format": "onnx", "precision": "int8"}, "ov": {"format": "openvino"},
                            "lite8": {"format": "tflite", "precision": "int8", "options": {"quantization": "static"}}}
    _validate(more)


@pytest.mark.parametrize("fmt", ["torchscript", "safetensors", "pytorch"])
def test_a_torch_only_format_from_a_tensorflow_source_is_one_line_naming_what_it_can_give(fmt):
    message = _one_line_error(lambda d: d["targets"].update({"t": {"format": fmt}}))
    assert f"conv.toml: targets.t.format: '{fmt}' is not allowed; expected a format a tensorflow source can give ('onnx', 'openvino', 'tensorrt', 'tflite', 'savedmodel'); {fmt} needs a torch or huggingface source" in message


@pytest.mark.parametrize("fmt", ["tflite", "savedmodel"])
def test_a_tensorflow_only_format_from_a_torch_source_names_the_source_it_needs(fmt):
    def torch_source(data):
        data["source"] = {"kind": "torch", "factory": "m:build"}
        data["targets"] = {"t": {"format": fmt}}
    message = _one_line_error(torch_source)
    assert f"targets.t.format: '{fmt}' is not allowed; expected a format a torch source can give" in message
    assert f"{fmt} needs a tensorflow source" in message


@pytest.mark.parametrize("source,key,text", [
    ({"kind": "tensorflow"}, "source.factory", "exactly one of source.factory (module:function) or source.path"),
    ({"kind": "tensorflow", "factory": "kmodels:convnet", "path": "m.keras"}, "source.factory", "exactly one of"),
    ({"kind": "tensorflow", "factory": "not a factory"}, "source.factory", "string should match pattern"),
    ({"kind": "tensorflow", "path": "m.keras", "allow_pickle": True}, "source.allow_pickle", "unknown key"),
])
def test_bad_tensorflow_source_tables_name_the_key(source, key, text):
    message = _one_line_error(lambda d: d.update({"source": source}))
    assert f"conv.toml: {key}: " in message and text in message


def test_an_input_without_a_shape_is_refused_for_a_tensorflow_source():
    message = _one_line_error(lambda d: d["inputs"][0].pop("shape"))
    assert "inputs[0].shape: '<missing>' is not allowed; expected a shape for every input of a tensorflow source" in message


def test_external_data_is_refused_for_a_tensorflow_source():
    message = _one_line_error(lambda d: d["targets"].update({"o": {"format": "onnx", "options": {"external_data": True}}}))
    assert "targets.o.options.external_data: True is not allowed; expected \"auto\" or false for a tensorflow source" in message


# ---- files and extras --------------------------------------------------------------------------


def _resolve(ws, name: str = "conv"):
    raw = read_manifest(ws.manifest(name))
    return resolve(validate(raw), raw, ws.root)


def _conv_workspace(root: Path, source: str):
    return keras_workspace(root, {"conv": CONVNET_MANIFEST.format(name="conv", source=source, targets=targets(tflite='format = "tflite"'))})


def test_a_factory_source_is_its_module_file(tmp_path: Path):
    ws = _conv_workspace(tmp_path / "ws", 'factory = "kmodels:convnet"')
    assert _resolve(ws).source_files == (ws.root / "kmodels.py",)


def test_a_saved_model_folder_is_every_file_in_it_saved_model_pb_first(tmp_path: Path):
    ws = _conv_workspace(tmp_path / "ws", 'path = "sm"')
    folder = ws.root / "manifests/sm"
    for name in ("variables/variables.index", "variables/variables.data-00000-of-00001", SAVED_MODEL_FILE, "fingerprint.pb", ".hidden"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    resolved = _resolve(ws)
    assert [p.relative_to(folder).as_posix() for p in resolved.source_files] == [
        SAVED_MODEL_FILE, "fingerprint.pb", "variables/variables.data-00000-of-00001", "variables/variables.index"]
    assert resolved.listed_folder[0] == folder


@pytest.mark.parametrize("make,text", [
    (lambda p: p.with_suffix(".h5").write_bytes(b"x"), "'m.h5' is not allowed; expected a .keras file or a SavedModel folder"),
    (lambda p: p.with_suffix(".h5").mkdir(), "is neither a .keras file nor a SavedModel folder (no saved_model.pb)"),
])
def test_a_path_that_is_neither_a_keras_file_nor_a_saved_model_is_refused(tmp_path: Path, make, text):
    ws = _conv_workspace(tmp_path / "ws", 'path = "m.h5"')
    make(ws.root / "manifests/m.keras")
    with pytest.raises(ManifestError, match="source.path: ") as caught:
        _resolve(ws)
    assert text in str(caught.value)


def test_a_tensorflow_manifest_without_tensorflow_installed_names_the_extra(tmp_path: Path, monkeypatch):
    import importlib.util

    ws = _conv_workspace(tmp_path / "ws", 'factory = "kmodels:convnet"')
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name, *a))
    with pytest.raises(ManifestError, match=r"source\.kind: source kind 'tensorflow' needs the 'tensorflow' package, which is not installed; install it with: pip install 'kiln\[tensorflow\]'"):
        _resolve(ws)


# ---- outputs by name or position ----------------------------------------------------------------


def test_dict_outputs_are_taken_by_name_whatever_their_order():
    assert named_outputs({"b": 2, "a": 1, "extra": 3}, ["a", "b"]) == {"a": 1, "b": 2}


def test_keras_positional_output_names_map_in_index_order():
    assert named_outputs({"output_10": "k", **{f"output_{i}": i for i in range(10)}}, [f"o{i}" for i in range(11)])["o10"] == "k"


def test_a_single_output_maps_whatever_its_name():
    assert named_outputs({"dense_3": 7}, ["scores"]) == {"scores": 7}
    assert named_outputs(7, ["scores"]) == {"scores": 7}


def test_a_list_maps_by_position():
    assert named_outputs([1, 2], ["logits", "aux"]) == {"logits": 1, "aux": 2}


def test_outputs_that_match_no_declared_name_fail_listing_what_the_model_has():
    with pytest.raises(StepError, match=r"the model's outputs are \['out_a', 'out_b'\]; the manifest declares \['logits', 'aux'\]"):
        named_outputs({"out_a": 1, "out_b": 2}, ["logits", "aux"])
    with pytest.raises(StepError, match=r"the model returns 3 outputs but the manifest declares 2"):
        named_outputs((1, 2, 3), ["logits", "aux"])


# ---- the reference run in TensorFlow --------------------------------------------------------------

INPUTS = [{"name": "features", "dtype": "float32", "shape": ["batch", 6]}]
OUTPUTS = [{"name": "scores", "dtype": "float32", "shape": ["batch", 3]}]


@pytest.fixture(scope="module")
def dense_sources(tmp_path_factory):
    """The dense model as a factory, a .keras file and a SavedModel (model.export), and its own outputs."""
    pytest.importorskip("tensorflow")
    ws = keras_workspace(tmp_path_factory.mktemp("tf") / "ws", {"d": DENSE_MANIFEST.format(name="d", source='factory = "kmodels:dense"', targets="")})
    save_keras_model(ws, "dense", ws.root / "dense.keras")
    save_keras_model(ws, "dense", ws.root / "dense_sm", saved_model=True)
    x = np.random.default_rng(5).standard_normal((7, 6)).astype(np.float32)
    import importlib.util

    spec = importlib.util.spec_from_file_location("kmodels_ref", ws.root / "kmodels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = module.dense()(x).numpy()
    return ws, x, expected


def _reference(ws, source: dict, files: list[Path], x, outputs=OUTPUTS) -> dict:
    run = Tensorflow().run_reference(iter([{"features": x}]), files, source, INPUTS, outputs, RunContext(ws.root, STEP))
    [(feed, result)] = list(run)
    assert feed["features"] is x
    return result


def test_the_reference_of_a_factory_is_the_keras_model_itself(dense_sources):
    ws, x, expected = dense_sources
    result = _reference(ws, {"kind": "tensorflow", "factory": "kmodels:dense"}, [ws.root / "kmodels.py"], x)
    assert result["scores"].dtype == np.float32 and result["scores"].shape == (7, 3)
    np.testing.assert_allclose(result["scores"], expected, atol=1e-6)


def test_the_reference_of_a_keras_file_is_the_saved_model(dense_sources):
    ws, x, expected = dense_sources
    result = _reference(ws, {"kind": "tensorflow", "path": "dense.keras"}, [ws.root / "dense.keras"], x)
    np.testing.assert_allclose(result["scores"], expected, atol=1e-6)


def test_the_reference_of_a_saved_model_runs_its_serving_signature(dense_sources):
    ws, x, expected = dense_sources
    folder = ws.root / "dense_sm"
    result = _reference(ws, {"kind": "tensorflow", "path": "dense_sm"}, [folder / SAVED_MODEL_FILE], x)  # output_0 -> scores
    np.testing.assert_allclose(result["scores"], expected, atol=1e-6)


def test_a_saved_model_whose_outputs_do_not_fit_the_manifest_fails_listing_its_outputs(dense_sources):
    ws, x, _ = dense_sources
    two = OUTPUTS + [{"name": "more", "dtype": "float32", "shape": ["batch", 3]}]
    with pytest.raises(StepError, match=r"the model's outputs are \['output_0'\]; the manifest declares \['scores', 'more'\]"):
        _reference(ws, {"kind": "tensorflow", "path": "dense_sm"}, [ws.root / "dense_sm" / SAVED_MODEL_FILE], x, two)


def test_a_factory_that_returns_no_keras_model_is_a_step_error(dense_sources):
    ws, x, _ = dense_sources
    with pytest.raises(StepError, match="kmodels:not_a_model returned int, not a keras.Model"):
        _reference(ws, {"kind": "tensorflow", "factory": "kmodels:not_a_model"}, [ws.root / "kmodels.py"], x)

