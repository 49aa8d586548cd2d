"""export_coreml_tf on a Keras conv net (tests/keras_workspaces.py's convnet: NHWC images, two named
outputs): fp32 and fp16 ML Programs whose inputs and outputs have the manifest's names, NHWC layout
and a batch range bounded by max_sizes, weights at the precision and the deployment target's spec
version; the validate step publishes them as structurally checked, and refuses a package that does
not match the target; two exports are byte-identical; an op coremltools cannot convert fails the
step in one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coreml_packages import package_files, step_for
from keras_workspaces import CONVNET_MANIFEST, FLEX_MANIFEST, keras_workspace, targets

pytest.importorskip("tensorflow")
pytest.importorskip("keras")
ct = pytest.importorskip("coremltools")

TARGETS = targets(coreml_fp32='format = "coreml"\nmax_sizes = { batch = 64 }',
                  coreml_fp16='format = "coreml"\nprecision = "fp16"\nminimum_deployment_target = "macOS13"\nmax_sizes = { batch = 64 }')


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    manifest = CONVNET_MANIFEST.format(name="kconv", source='factory = "kmodels:convnet"', targets=TARGETS)
    return keras_workspace(tmp_path_factory.mktemp("coreml_tf") / "ws", {"kconv": manifest})


def export(ws, target: str, out: Path, name: str = "kconv") -> Path:
    """Run the target's export_coreml_tf step into `out`; returns `out`."""
    from kiln.rules import RunContext, get_rule

    step = step_for(ws, target, "export_coreml_tf", name)
    rule = get_rule("export_coreml_tf")
    rule().run({role: list(files) for role, files in step.inputs.items()}, {"model": out}, rule.Params(**step.params), RunContext(ws.root, step.name))
    return out


@pytest.fixture(scope="module")
def packages(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("packages")
    return {target: export(ws, target, out / f"{target}.mlpackage") for target in ("coreml_fp32", "coreml_fp16")}


def validate(ws, target: str, package: Path, out: Path) -> dict:
    """The target's validate step on `package`, published under `out`; its validation.json."""
    from kiln.build_rules.validate import Validate, ValidateParams
    from kiln.rules import RunContext

    step = step_for(ws, target, "validate", "kconv")
    outputs = {"artifact": out / "model.mlpackage", "validation": out / "validation.json"}
    out.mkdir(exist_ok=True)
    Validate().run({"model": [package], "reference": [out / "unused.safetensors"]}, outputs, ValidateParams(**step.params), RunContext(ws.root, step.name))
    return json.loads(outputs["validation"].read_text())


def test_the_packages_pass_the_structural_check_with_the_manifest_names_layout_bounds_and_precision(ws, packages, tmp_path: Path):
    for target, weights, version in (("coreml_fp32", "FLOAT32", "specification version 6 "), ("coreml_fp16", "FLOAT16", "specification version 7 ")):
        written = validate(ws, target, packages[target], tmp_path / target)
        assert written["validated"] == "structural" and written["passed"] is True and "metrics" not in written
        assert written["not_validated"] == "structural check only: Core ML needs macOS to run"
        checks = written["structural_checks"]
        assert checks["inputs"] == {"image": "FLOAT32 [1..64, 16, 16, 3]"}, target  # NHWC kept, the batch 1..max_sizes
        assert checks["outputs"] == {"logits": "FLOAT32 [?, 5]", "aux": "FLOAT32 [?, 2]"}, target  # the manifest's names, not TF's Identity
        assert checks["weights"].endswith(f"all {weights}") and checks["deployment_target"].startswith(version), target
        assert package_files(tmp_path / target / "model.mlpackage") == package_files(packages[target])
    spec = ct.utils.load_spec(str(packages["coreml_fp16"]))
    assert spec.mlProgram.functions["main"].opset == "CoreML6"  # macOS13's op set
    assert "com.github.apple.coremltools.conversion_date" not in spec.description.metadata.userDefined


def test_a_package_that_does_not_match_the_target_fails_validation_and_publishes_nothing(ws, packages, tmp_path: Path):
    from kiln.errors import StepError

    with pytest.raises(StepError) as caught:  # the fp16 target handed the fp32 package
        validate(ws, "coreml_fp16", packages["coreml_fp32"], tmp_path / "precision")
    assert "is FLOAT32 in the Core ML package; a fp16 target stores its weights as FLOAT16" in str(caught.value)
    assert not (tmp_path / "precision/model.mlpackage").exists()
    ws.edit("16, 16, 3]", "3, 16, 16]", "kconv")  # the manifest now says NCHW: the NHWC package is not what it declares
    try:
        with pytest.raises(StepError) as caught:
            validate(ws, "coreml_fp32", packages["coreml_fp32"], tmp_path / "shape")
    finally:
        ws.edit("3, 16, 16]", "16, 16, 3]", "kconv")
    assert "input 'image' axis 1 takes 16 in the Core ML package; the manifest's 3 means 3" in str(caught.value)
    assert not (tmp_path / "shape/model.mlpackage").exists()


def test_a_second_export_is_byte_identical_and_leaves_no_work_folder(ws, packages, tmp_path: Path):
    again = export(ws, "coreml_fp16", tmp_path / "again.mlpackage")
    assert package_files(again) == package_files(packages["coreml_fp16"])
    assert [p.name for p in tmp_path.iterdir()] == ["again.mlpackage"]


def test_an_op_coremltools_cannot_convert_fails_in_one_line_naming_it(tmp_path: Path):
    from kiln.errors import StepError

    manifest = FLEX_MANIFEST.replace('[targets.tflite]\nformat = "tflite"', '[targets.c]\nformat = "coreml"')
    ws = keras_workspace(tmp_path / "ws", {"flex": manifest})
    with pytest.raises(StepError) as caught:
        export(ws, "c", tmp_path / "c.mlpackage", "flex")
    message = str(caught.value)
    assert message.startswith("flex/c/export_coreml_tf: ") and "\n" not in message
    assert "has no Core ML conversion for TensorFlow op 'MatrixInverse' (graph node '" in message
    assert not (tmp_path / "c.mlpackage").exists() and not list(tmp_path.glob(".*"))
