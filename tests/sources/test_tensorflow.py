"""kind = "tensorflow": the [source] table and what it can give (one-line errors), its files (a .keras
file, a SavedModel folder listed, a factory's module), the extra it needs, how the model's outputs
meet the manifest's names, and the reference run in TensorFlow (factory, .keras, SavedModel)."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import numpy as np
import pytest

from keras_workspaces import CONVNET_MANIFEST, DENSE_MANIFEST, PAIR_MANIFEST, keras_workspace, save_keras_model, targets
from kiln.define.resolve import resolve
from kiln.define.spec import validate
from kiln.errors import ManifestError, StepError
from kiln.rules import RunContext
from kiln.schema.manifest import RawManifest, read_manifest
from kiln.sources.tensorflow import SAVED_MODEL_FILE, Tensorflow, keras_outputs, named_outputs

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
    assert f"conv.toml: targets.t.format: '{fmt}' is not allowed; expected a format a tensorflow source can give ('onnx', 'openvino', 'tensorrt', 'coreml', 'tflite', 'savedmodel'); {fmt} needs a torch or huggingface source" in message


@pytest.mark.parametrize("fmt", ["savedmodel"])  # tflite comes from torch sources too (litert-torch)
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


def test_signature_dict_outputs_are_taken_by_name_whatever_their_order():
    assert named_outputs({"b": 2, "a": 1, "extra": 3}, ["a", "b"]) == {"a": 1, "b": 2}


def test_keras_positional_output_names_of_a_signature_map_in_index_order():
    assert named_outputs({"output_10": "k", **{f"output_{i}": i for i in range(10)}}, [f"o{i}" for i in range(11)])["o10"] == "k"


def test_a_single_output_maps_whatever_its_name():
    assert named_outputs({"dense_3": 7}, ["scores"]) == {"scores": 7}
    assert keras_outputs(7, ["scores"], ["dense_3"]) == {"scores": 7}
    assert keras_outputs({"dense_3": 7}, ["scores"], []) == {"scores": 7}


def test_signature_outputs_that_match_no_declared_name_fail_listing_what_the_model_has():
    with pytest.raises(StepError, match=r"the model's outputs are \['out_a', 'out_b'\]; the manifest declares \['logits', 'aux'\]"):
        named_outputs({"out_a": 1, "out_b": 2}, ["logits", "aux"])


def test_a_keras_list_result_maps_by_the_models_output_names_never_by_position():
    assert keras_outputs([1, 2], ["diff", "sum"], ["sum", "diff"]) == {"diff": 2, "sum": 1}
    assert keras_outputs({"sum": 1, "diff": 2}, ["diff", "sum"], ["add", "subtract"]) == {"diff": 2, "sum": 1}  # a dict: its keys


@pytest.mark.parametrize("result,model_names,text", [
    ([1, 2], ["dense", "dense_1"], r"the manifest declares output 'logits', which the model does not have; its outputs are \['dense', 'dense_1'\]"),
    ((1, 2), [], r"the model returns 2 unnamed outputs; the manifest declares \['logits', 'aux'\] \(kiln matches two or more outputs by name"),
    ({"logits": 1, "other": 2}, [], r"the manifest declares output 'aux', which the model does not have; its outputs are \['logits', 'other'\]"),
])
def test_keras_outputs_without_the_declared_names_fail_in_one_line(result, model_names, text):
    with pytest.raises(StepError, match=text) as caught:
        keras_outputs(result, ["logits", "aux"], model_names)
    assert "\n" not in str(caught.value)


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



def test_a_keras_file_with_a_custom_class_names_it_in_one_line(dense_sources):
    ws, x, _ = dense_sources
    save_keras_model(ws, "custom", ws.root / "custom.keras")  # its class Twice lives in a module Keras cannot import
    with pytest.raises(StepError) as caught:
        _reference(ws, {"kind": "tensorflow", "path": "custom.keras"}, [ws.root / "custom.keras"], x)
    message = str(caught.value)
    assert message.startswith("source: custom.keras uses the custom class 'Twice', which Keras cannot find here; use source.factory")
    assert "\n" not in message and len(message) < 250


# ---- two inputs and two outputs: by name, whatever the manifest's order ----------------------------------

PAIR_INPUTS = [{"name": "b", "dtype": "float32", "shape": ["batch", 6]}, {"name": "a", "dtype": "float32", "shape": ["batch", 6]}]
PAIR_OUTPUTS = [{"name": "diff", "dtype": "float32", "shape": ["batch", 6]}, {"name": "sum", "dtype": "float32", "shape": ["batch", 6]}]


@pytest.fixture(scope="module")
def pair_workspace(tmp_path_factory):
    pytest.importorskip("tensorflow")
    ws = keras_workspace(tmp_path_factory.mktemp("pair") / "ws", {"p": PAIR_MANIFEST.format(name="p", factory="pair", targets="")})
    rng = np.random.default_rng(8)
    return ws, {"a": (100 + rng.standard_normal((4, 6))).astype(np.float32), "b": rng.standard_normal((4, 6)).astype(np.float32)}


def _pair_reference(ws, factory: str, feed: dict, inputs=PAIR_INPUTS, outputs=PAIR_OUTPUTS) -> dict:
    source = {"kind": "tensorflow", "factory": f"kmodels:{factory}"}
    [(_, result)] = list(Tensorflow().run_reference(iter([feed]), [ws.root / "kmodels.py"], source, inputs, outputs, RunContext(ws.root, STEP)))
    return result


@pytest.mark.parametrize("factory", ["pair", "dict_pair"])
def test_inputs_and_outputs_declared_in_another_order_than_the_models_meet_by_name(pair_workspace, factory):
    ws, feed = pair_workspace
    result = _pair_reference(ws, factory, feed)
    np.testing.assert_allclose(result["diff"], feed["a"] - feed["b"], rtol=1e-6)  # a - b: the model's diff of its own a and b
    np.testing.assert_allclose(result["sum"], feed["a"] + feed["b"], rtol=1e-6)


def test_the_reference_is_the_model_called_with_its_inputs_by_name(pair_workspace):
    import importlib.util

    ws, feed = pair_workspace
    spec = importlib.util.spec_from_file_location("kmodels_pair", ws.root / "kmodels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    total, difference = module.pair()({"a": feed["a"], "b": feed["b"]})
    result = _pair_reference(ws, "pair", feed)
    np.testing.assert_array_equal(result["sum"], total.numpy())
    np.testing.assert_array_equal(result["diff"], difference.numpy())


def test_inputs_the_model_does_not_name_fail_listing_its_names(pair_workspace):
    ws, feed = pair_workspace
    renamed = [{**PAIR_INPUTS[0], "name": "first"}, PAIR_INPUTS[1]]
    with pytest.raises(StepError, match=r"the model takes inputs \['a', 'b'\]; the manifest declares \['first', 'a'\]"):
        _pair_reference(ws, "pair", {"first": feed["b"], "a": feed["a"]}, inputs=renamed)


def test_two_outputs_with_keras_automatic_names_are_not_matched_by_position(pair_workspace):
    ws, feed = pair_workspace
    inputs = [{"name": "features", "dtype": "float32", "shape": ["batch", 6]}]
    outputs = [{"name": "first", "dtype": "float32", "shape": ["batch", 3]}, {"name": "second", "dtype": "float32", "shape": ["batch", 3]}]
    with pytest.raises(StepError, match=r"the manifest declares output 'first', which the model does not have; its outputs are \['dense(_\d+)?', 'dense_\d+'\]"):
        _pair_reference(ws, "unnamed_pair", {"features": feed["b"]}, inputs=inputs, outputs=outputs)


# ---- the scratch SavedModel the converters read ------------------------------------------------------


def test_the_scratch_saved_model_is_a_temp_of_the_output_the_sweep_knows_and_is_deleted(dense_sources, tmp_path: Path):
    import os

    from kiln.base.temps import final_name, sweep_stale_temps
    from kiln.sources.tensorflow import scratch_serving_savedmodel

    ws, _, _ = dense_sources
    output = tmp_path / ".model.tflite.kiln-1-2.tmp"  # the step runner's temp output
    args = ({"kind": "tensorflow", "factory": "kmodels:dense"}, [ws.root / "kmodels.py"], INPUTS, OUTPUTS, ws.root, output)
    with scratch_serving_savedmodel(*args) as folder:
        assert folder.parent == tmp_path and (folder / SAVED_MODEL_FILE).is_file()
        assert final_name(folder) == "model.tflite" and f".kiln-{os.getpid()}-" in folder.name  # whose it is: this process
        dead = folder.with_name(folder.name.replace(f".kiln-{os.getpid()}-", ".kiln-999999999-"))
        folder.rename(dead)  # as a killed build leaves it
        sweep_stale_temps(tmp_path)
        assert not dead.exists()
        dead.mkdir()
        dead.rename(folder)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="converter failed"), scratch_serving_savedmodel(*args):
        raise RuntimeError("converter failed")
    assert list(tmp_path.iterdir()) == []  # deleted on failure too


# ---- fp32 means fp32 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16", "float16"])
def test_a_model_computing_below_float32_is_refused_for_an_fp32_target(policy):
    keras = pytest.importorskip("keras")
    from kiln.sources.tensorflow import require_float32

    x = keras.Input((6,))
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, dtype=policy, name="half")])
    with pytest.raises(StepError, match=rf"source: layer 'half' computes in b?float16 \(dtype policy '{policy}'\); a savedmodel target is fp32"):
        require_float32(keras.Model(x, inner(x)), "savedmodel")  # nested: found all the same
    require_float32(keras.Model(x, keras.layers.Dense(3)(x)), "savedmodel")
