"""kiln.formats.coreml: the target table and its checks (deployment targets as coremltools names
them, dtypes Core ML has, bounds of dynamic axes, sources that cannot give Core ML), and the
structural check that stands in for running the package off macOS: a package that matches the
manifest passes as "structural" with what was checked; a wrong name, shape, dtype, precision,
deployment target or missing weight blob fails naming the tensor. On macOS, MLModel.predict."""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

import pytest

from coreml_packages import coreml_workspace, export, tinycnn_manifest
from kiln.errors import ManifestError, StepError
from kiln.define.spec import validate
from kiln.formats.coreml import DEPLOYMENT_TARGETS, STRUCTURAL_ONLY, Coreml
from kiln.runtime.runners import Artifact, StructuralOnly
from kiln.schema.manifest import RawManifest

MANIFEST = Path("/ws/manifests/tinycnn.toml")
INPUTS = [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
OUTPUTS = [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]


def _spec(targets: str, change=lambda d: None):
    data = tomllib.loads(tinycnn_manifest(targets))
    change(data)
    return validate(RawManifest(MANIFEST, data))


def _error(targets: str, change=lambda d: None) -> str:
    with pytest.raises(ManifestError) as caught:
        _spec(targets, change)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---- the target table -----------------------------------------------------------------------------


def test_the_defaults_are_an_fp32_trace_for_ios15_with_bounded_dynamic_axes():
    spec = _spec('[targets.c]\nformat = "coreml"\n')
    target = spec.targets["c"]
    assert (target.precision, target.minimum_deployment_target, target.via, target.max_sizes) == ("fp32", "iOS15", "trace", {})


def test_the_deployment_targets_are_coremltools_ml_program_targets():
    ct = pytest.importorskip("coremltools")
    assert DEPLOYMENT_TARGETS == {name: t.value for name, t in ct.target.__members__.items() if t.value >= 6}


def test_a_bad_deployment_target_is_one_line_naming_the_key_and_the_allowed_names():
    message = _error('[targets.c]\nformat = "coreml"\nminimum_deployment_target = "iOS14"\n')
    assert message.startswith(f"{MANIFEST}: targets.c.minimum_deployment_target: 'iOS14' is not allowed; expected 'iOS15', 'iOS16'")
    assert "'iOS15'" in message and "'macOS12'" in message


@pytest.mark.parametrize("kind, source", [("onnx", {"kind": "onnx", "path": "models/m.onnx"}),
                                          ("sklearn", {"kind": "sklearn", "factory": "models.iris:build"})])
def test_a_source_that_is_no_model_in_a_framework_cannot_give_coreml(kind: str, source: dict):
    message = _error('[targets.c]\nformat = "coreml"\n', lambda d: d.__setitem__("source", source))
    assert "targets.c.format: 'coreml' is not allowed" in message and f"{kind} source can give" in message
    assert message.endswith("coreml needs a tensorflow or torch or huggingface source")


def _keras_spec(target_lines: str = ""):
    def keras(d):
        d["source"] = {"kind": "tensorflow", "factory": "models.keras_convnet:build"}
        d["inputs"][0]["shape"] = ["batch", 24, 24, 3]  # NHWC, as Keras takes images

    return _spec(f'[targets.c]\nformat = "coreml"\n{target_lines}', keras)


def test_a_tensorflow_source_plans_the_tf_export_without_via():
    from kiln.define.resolve import Resolved
    from kiln.plan.chains import plan

    spec = _keras_spec('precision = "fp16"\nminimum_deployment_target = "macOS13"\nmax_sizes = { batch = 64 }\n')
    root = Path("/ws")
    steps = plan(spec, Resolved((root / "manifests/models/keras_convnet.py",), root / "manifests/data/tinycnn.npz", None), MANIFEST, root).steps
    assert [s.rule for s in steps] == ["reference_outputs", "export_coreml_tf", "validate"]
    assert {k: steps[1].params[k] for k in ("precision", "minimum_deployment_target", "max_sizes")} == {"precision": "fp16", "minimum_deployment_target": "macOS13", "max_sizes": {"batch": 64}}
    assert "via" not in steps[1].params  # one way in: a via would change the key and mean nothing
    assert steps[2].params["format_options"] == {"minimum_deployment_target": "macOS13", "max_sizes": {"batch": 64}}
    assert steps[2].params["inputs"][0]["shape"] == ["batch", 24, 24, 3]


def test_via_is_refused_for_a_tensorflow_source():
    with pytest.raises(ManifestError) as caught:
        _keras_spec('via = "trace"\n')
    assert "targets.c.via: 'trace' is not allowed; expected no via for a tensorflow source" in str(caught.value) and "\n" not in str(caught.value)


def test_a_huggingface_source_is_converted_traced_only():
    def hf(d):
        d["source"] = {"kind": "huggingface", "path": "tiny-bert"}

    message = _error('[targets.c]\nformat = "coreml"\nvia = "torch_export"\n', hf)
    assert "targets.c.via: 'torch_export' is not allowed" in message and "__and__" in message


def test_dtypes_core_ml_lacks_are_refused_naming_the_tensor():
    message = _error('[targets.c]\nformat = "coreml"\n', lambda d: d["inputs"][0].__setitem__("dtype", "uint8"))
    assert "inputs[0].dtype: 'uint8' is not allowed" in message and "float32, float16, int32 or int64" in message
    message = _error('[targets.c]\nformat = "coreml"\n', lambda d: d["outputs"][0].__setitem__("dtype", "float16"))
    assert "targets.c.minimum_deployment_target: 'iOS15' is not allowed" in message and "outputs[0] is float16" in message
    _spec('[targets.c]\nformat = "coreml"\nminimum_deployment_target = "iOS16"\n', lambda d: d["outputs"][0].__setitem__("dtype", "float16"))


def test_an_input_needs_axes():
    for change in (lambda d: d["inputs"][0].pop("shape"), lambda d: d["inputs"][0].__setitem__("shape", [])):
        message = _error('[targets.c]\nformat = "coreml"\n', change)
        assert "inputs[0].shape:" in message and "a Core ML tensor has a fixed rank (targets.c is coreml)" in message


def test_max_sizes_name_dynamic_axes_and_hold_a_validation_batch():
    assert "targets.c.max_sizes: 'sequence' is not allowed" in _error('[targets.c]\nformat = "coreml"\nmax_sizes = { sequence = 8 }\n')
    message = _error('[targets.c]\nformat = "coreml"\nmax_sizes = { batch = 4 }\n')  # validation.batch_size = 8
    assert "targets.c.max_sizes" in message and "validation.batch_size (8)" in message


def test_the_plan_gives_the_export_every_bound_and_the_validate_step_the_tensors():
    from kiln.define.resolve import Resolved
    from kiln.plan.chains import plan

    spec = _spec('[targets.c]\nformat = "coreml"\nprecision = "fp16"\nminimum_deployment_target = "macOS13"\n')
    root = Path("/ws")
    steps = plan(spec, Resolved((root / "manifests/models/tinycnn.py",), root / "manifests/data/tinycnn.npz", None), MANIFEST, root).steps
    assert [s.rule for s in steps] == ["reference_outputs", "export_coreml", "validate"]
    export_step, validate_step = steps[1], steps[2]
    assert {k: export_step.params[k] for k in ("precision", "minimum_deployment_target", "via", "max_sizes")} == \
        {"precision": "fp16", "minimum_deployment_target": "macOS13", "via": "trace", "max_sizes": {"batch": 1024}}
    assert validate_step.outputs["artifact"].name == "model.mlpackage"
    assert validate_step.params["format_options"] == {"minimum_deployment_target": "macOS13", "via": "trace", "max_sizes": {"batch": 1024}}
    assert validate_step.params["output_specs"][0]["shape"] == ["batch", 10]


HF_TEXT = '''
[model]
name = "tinybert"

[source]
kind = "huggingface"
path = "tiny-bert"

[[inputs]]
name = "input_ids"
dtype = "int64"
shape = ["batch", "sequence"]

[[inputs]]
name = "attention_mask"
dtype = "int64"
shape = ["batch", "sequence"]

[[outputs]]
name = "last_hidden_state"
shape = ["batch", "sequence", 32]

[targets.c]
format = "coreml"
%s

[validation]
data = "data/sentences.txt"
%s
'''


def _hf_spec(target_lines: str = "", validation_lines: str = ""):
    return validate(RawManifest(MANIFEST, tomllib.loads(HF_TEXT % (target_lines, validation_lines))))


def test_a_text_length_bound_below_the_validation_max_length_is_refused():
    """The package would refuse the longer validation lines; off macOS nothing would feed them."""
    with pytest.raises(ManifestError) as caught:
        _hf_spec("max_sizes = { sequence = 32 }", "max_length = 64")
    message = str(caught.value)
    assert "targets.c.max_sizes" in message and "a 'sequence' bound of at least validation.max_length (64)" in message and "\n" not in message
    with pytest.raises(ManifestError, match=r"at least validation.max_length \(128\)"):
        _hf_spec("max_sizes = { sequence = 32 }")  # the default max_length counts too
    _hf_spec("max_sizes = { sequence = 64 }", "max_length = 64")


def test_a_huggingface_text_length_defaults_to_the_models_positions():
    from kiln.define.resolve import Resolved
    from kiln.plan.chains import plan

    root = Path("/ws")
    resolved = Resolved((root / "manifests/tiny-bert/config.json",), root / "manifests/data/sentences.txt", None, text_positions=40)
    steps = plan(_hf_spec(), resolved, MANIFEST, root).steps
    (export_step,) = [s for s in steps if s.rule == "export_coreml"]
    (validate_step,) = [s for s in steps if s.rule == "validate"]
    assert export_step.params["max_sizes"] == {"batch": 1024, "sequence": 40}  # not 1024 tokens the model has no positions for
    assert validate_step.params["format_options"]["max_sizes"] == {"batch": 1024, "sequence": 40}


def test_the_validate_key_says_whether_core_ml_runs_here_so_a_mac_revalidates(monkeypatch):
    """A structural result from Linux is not up to date on a Mac (and a cached one not restored):
    Core ML's runtime is in the validate step's key; every other format's key has no hardware."""
    import platform

    from kiln.formats import coreml
    from kiln.rules import get_rule
    from kiln.state.uptodate import describe_change

    validate_rule = get_rule("validate")
    linux = validate_rule.hardware_for({"format": "coreml"})
    assert linux == {"coreml_runtime": f"none ({sys.platform})"} or sys.platform == "darwin"
    assert validate_rule.hardware_for({"format": "onnx"}) is None and validate_rule.hardware_for({"format": "tensorrt"}) is None
    monkeypatch.setattr(coreml, "native_runtime", lambda: True)
    monkeypatch.setattr(platform, "mac_ver", lambda: ("15.1", ("", "", ""), "arm64"))
    mac = validate_rule.hardware_for({"format": "coreml"})
    assert mac == {"coreml_runtime": "macOS 15.1"}
    base = {"rule": "validate", "version": validate_rule.version, "params": {}, "inputs": {}, "tools": {}}
    assert describe_change(base | {"hardware": {"coreml_runtime": "none (linux)"}}, base | {"hardware": mac}).startswith("hardware changed")


# ---- the structural check -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    pytest.importorskip("coremltools")
    root = tmp_path_factory.mktemp("coreml")
    ws = coreml_workspace(root / "ws")
    return {target: export(ws, target, root / f"{target}.mlpackage") for target in ("coreml_fp32", "coreml_fp16")}


def _artifact(package: Path, precision: str, inputs=INPUTS, outputs=OUTPUTS, target: str = "iOS15", max_sizes=None) -> Artifact:
    return Artifact(package, [o["name"] for o in outputs], "m/c/validate", inputs=inputs, precision=precision, output_specs=outputs,
                    options={"minimum_deployment_target": target, "max_sizes": max_sizes or {"batch": 1024}})


def _checked(artifact: Artifact) -> StructuralOnly:
    with pytest.raises(StructuralOnly) as caught:
        Coreml().open_runner(artifact)
    return caught.value


def _mismatch(artifact: Artifact) -> str:
    with pytest.raises(StepError) as caught:
        Coreml().open_runner(artifact)
    message = str(caught.value)
    assert message.startswith("m/c/validate: ") and "\n" not in message
    return message


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs here: the package is validated numerically")
def test_a_matching_package_passes_as_structural_saying_what_was_checked(packages):
    for target, precision in (("coreml_fp32", "fp32"), ("coreml_fp16", "fp16")):
        result = _checked(_artifact(packages[target], precision))
        assert str(result) == STRUCTURAL_ONLY
        assert result.checks["inputs"] == {"image": "FLOAT32 [1..1024, 3, 32, 32]"} and result.checks["outputs"] == {"logits": "FLOAT32 [?, 10]"}
        assert result.checks["weights"] == f"6 weight tensors (5418 values), all {'FLOAT16' if precision == 'fp16' else 'FLOAT32'}"
        assert "iOS15" in result.checks["deployment_target"]


def test_a_wrong_output_name_fails_naming_it(packages):
    outputs = [OUTPUTS[0] | {"name": "scores"}]
    assert "output 'scores' is not in the Core ML package; it has ['logits']" in _mismatch(_artifact(packages["coreml_fp32"], "fp32", outputs=outputs))


def test_a_wrong_input_name_fails_naming_it(packages):
    inputs = [INPUTS[0] | {"name": "pixels"}]
    assert "input 'pixels' is not in the Core ML package; it has ['image']" in _mismatch(_artifact(packages["coreml_fp32"], "fp32", inputs=inputs))


def test_wrong_shapes_fail_naming_the_tensor_and_axis(packages):
    package = packages["coreml_fp32"]
    message = _mismatch(_artifact(package, "fp32", inputs=[INPUTS[0] | {"shape": ["batch", 3, 64, 64]}]))
    assert "input 'image' axis 2 takes 32 in the Core ML package; the manifest's 64 means 64" in message
    message = _mismatch(_artifact(package, "fp32", inputs=[INPUTS[0] | {"shape": [8, 3, 32, 32]}]))
    assert "input 'image' axis 0 takes 1..1024" in message
    message = _mismatch(_artifact(package, "fp32", max_sizes={"batch": 64}))
    assert "the manifest's 'batch' means 1..64" in message
    assert "output 'logits' axis 1 is 10 in the Core ML program; the manifest declares 12" in _mismatch(_artifact(package, "fp32", outputs=[OUTPUTS[0] | {"shape": ["batch", 12]}]))
    assert "output 'logits' has rank 2" in _mismatch(_artifact(package, "fp32", outputs=[OUTPUTS[0] | {"shape": ["batch", 10, 1]}]))


def test_a_wrong_dtype_fails_naming_the_tensor(packages):
    message = _mismatch(_artifact(packages["coreml_fp32"], "fp32", inputs=[INPUTS[0] | {"dtype": "int64"}]))
    assert "input 'image' is FLOAT32 in the Core ML package; the manifest's int64 is INT32 in Core ML" in message


def test_weights_at_another_precision_fail(packages):
    assert "a fp16 target stores its weights as FLOAT16" in _mismatch(_artifact(packages["coreml_fp32"], "fp16"))
    assert "is FLOAT16 in the Core ML package; a fp32 target stores its weights as FLOAT32" in _mismatch(_artifact(packages["coreml_fp16"], "fp32"))


def test_a_package_newer_than_the_deployment_target_fails(tmp_path: Path):
    pytest.importorskip("coremltools")
    ws = coreml_workspace(tmp_path / "ws", '[targets.c]\nformat = "coreml"\nminimum_deployment_target = "iOS17"\n')
    package = export(ws, "c", tmp_path / "c.mlpackage")
    assert "the package has specification version 8; minimum_deployment_target iOS15 reads up to 6" in _mismatch(_artifact(package, "fp32"))
    _checked(_artifact(package, "fp32", target="macOS14"))  # the same version under its macOS name


def test_a_missing_weight_blob_or_a_broken_package_fails(packages, tmp_path: Path):
    broken = tmp_path / "c.mlpackage"
    shutil.copytree(packages["coreml_fp32"], broken)
    (broken / "Data/com.apple.CoreML/weights/weight.bin").write_bytes(b"")
    assert "which the package does not hold" in _mismatch(_artifact(broken, "fp32"))
    (broken / "Manifest.json").write_text("{}")
    assert "coremltools cannot load c.mlpackage" in _mismatch(_artifact(broken, "fp32"))


def test_a_manifest_item_missing_from_the_package_fails_naming_it(packages, tmp_path: Path):
    """An empty weights folder lost in a copy: Core ML would refuse the package ("Item does not exist")."""
    broken = tmp_path / "c.mlpackage"
    shutil.copytree(packages["coreml_fp32"], broken)
    shutil.rmtree(broken / "Data/com.apple.CoreML/weights")
    assert "c.mlpackage's Manifest.json lists item 'com.apple.CoreML/weights' (CoreML Model Weights), which the package does not hold" in _mismatch(_artifact(broken, "fp32"))


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML runs only on macOS; elsewhere kiln checks the package structurally")
def test_on_macos_the_package_runs_and_matches_the_source(packages):  # pragma: no cover - macOS only
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "manifests"))
    from models.tinycnn import build, validation_images

    images = validation_images(4)
    run = Coreml().open_runner(_artifact(packages["coreml_fp32"], "fp32"))
    with torch.no_grad():
        want = build()(torch.from_numpy(images)).numpy()
    assert np.abs(run({"image": images})["logits"] - want).max() < 1e-3
