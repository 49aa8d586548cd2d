"""export_coreml on manifests/tinycnn.toml's convnet: fp32 traced and fp16 via torch.export give ML
Program packages with the manifest's names, a dynamic batch range and weights at the precision;
two exports are byte-identical (Manifest.json's UUIDs and the conversion date normalised) and still
load in coremltools; a transformers 5 BERT converts with the new_ones shim; a conversion failure is
one line naming coremltools; the validate step publishes a structurally checked package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coreml_packages import coreml_workspace, export, package_files, step_for

ct = pytest.importorskip("coremltools")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return coreml_workspace(tmp_path_factory.mktemp("coreml") / "ws")


@pytest.fixture(scope="module")
def packages(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("packages")
    return {target: export(ws, target, out / f"{target}.mlpackage") for target in ("coreml_fp32", "coreml_fp16")}


def _program(package: Path):
    spec = ct.utils.load_spec(str(package))
    function = spec.mlProgram.functions["main"]
    return spec, function.block_specializations[function.opset].operations


def test_packages_take_the_manifest_names_a_batch_range_and_store_weights_at_the_precision(packages):
    from coremltools.proto import MIL_pb2

    for target, want in (("coreml_fp32", "FLOAT32"), ("coreml_fp16", "FLOAT16")):
        spec, ops = _program(packages[target])
        assert [i.name for i in spec.description.input] == ["image"] and [o.name for o in spec.description.output] == ["logits"]
        ranges = [(r.lowerBound, r.upperBound) for r in spec.description.input[0].type.multiArrayType.shapeRange.sizeRanges]
        assert ranges == [(1, 1024), (3, 3), (32, 32), (32, 32)], target
        weights = {MIL_pb2.DataType.Name(op.outputs[0].type.tensorType.dataType) for op in ops
                   if op.type == "const" and op.outputs[0].type.tensorType.rank >= 1 and op.outputs[0].type.tensorType.dataType in (MIL_pb2.FLOAT16, MIL_pb2.FLOAT32)}
        assert weights == {want}, target
        assert spec.specificationVersion == 6 and "com.github.apple.coremltools.conversion_date" not in spec.description.metadata.userDefined
    assert (packages["coreml_fp16"] / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size < 0.6 * (packages["coreml_fp32"] / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size


def test_a_second_export_is_byte_identical_and_loads(ws, packages, tmp_path: Path):
    for target in ("coreml_fp32", "coreml_fp16"):
        again = export(ws, target, tmp_path / f"{target}.mlpackage")
        assert package_files(again) == package_files(packages[target]), target
        ct.models.MLModel(str(again), skip_model_load=True)  # the normalised package is still one coremltools reads
    manifest = json.loads((packages["coreml_fp32"] / "Manifest.json").read_text())
    assert manifest["rootModelIdentifier"] in manifest["itemInfoEntries"]
    assert sorted(item["path"] for item in manifest["itemInfoEntries"].values()) == ["com.apple.CoreML/model.mlmodel", "com.apple.CoreML/weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coreml_fp16.mlpackage", "coreml_fp32.mlpackage"]  # no work folder left


def test_uuids_follow_the_contents(packages):
    ids = [set(json.loads((packages[t] / "Manifest.json").read_text())["itemInfoEntries"]) for t in ("coreml_fp32", "coreml_fp16")]
    assert not ids[0] & ids[1]  # different weights, different item ids: not one constant id for every package


def test_the_deployment_target_and_bounds_reach_the_package(tmp_path: Path):
    from coremltools.proto import FeatureTypes_pb2

    ws = coreml_workspace(tmp_path / "ws", '[targets.c]\nformat = "coreml"\nprecision = "fp16"\nminimum_deployment_target = "macOS14"\nmax_sizes = { batch = 16 }\n')
    spec, _ = _program(export(ws, "c", tmp_path / "c.mlpackage"))
    assert spec.specificationVersion == 8 and spec.mlProgram.functions["main"].opset == "CoreML7"
    assert spec.description.input[0].type.multiArrayType.shapeRange.sizeRanges[0].upperBound == 16
    # fp16 from macOS13 on: coremltools would make the float32 outputs float16 unless told their dtype
    assert [f.type.multiArrayType.dataType for f in spec.description.output] == [FeatureTypes_pb2.ArrayFeatureType.FLOAT32]


def test_a_conversion_failure_is_one_line_naming_coremltools(tmp_path: Path):
    from kiln.errors import StepError

    ws = coreml_workspace(tmp_path / "ws", '[targets.c]\nformat = "coreml"\n')
    (ws.root / "manifests/models/tinycnn.py").write_text(
        "import torch\n\nclass Odd(torch.nn.Module):\n    def forward(self, image):\n        return torch.special.airy_ai(image).flatten(1)[:, :10]\n\n"
        "def build():\n    return Odd()\n")
    with pytest.raises(StepError) as caught:
        export(ws, "c", tmp_path / "c.mlpackage")
    message = str(caught.value)
    assert message.startswith("tinycnn/c/export_coreml: coremltools could not convert the model: ") and "\n" not in message
    assert not (tmp_path / "c.mlpackage").exists() and not list(tmp_path.glob(".*"))


def test_the_validate_step_publishes_a_structurally_checked_package(ws, packages, tmp_path: Path):
    from kiln.build_rules.validate import Validate, ValidateParams
    from kiln.rules import RunContext

    step = step_for(ws, "coreml_fp16", "validate")
    out = tmp_path / "published"
    outputs = {"artifact": out / "model.mlpackage", "validation": out / "validation.json"}
    out.mkdir()
    facts = Validate().run({"model": [packages["coreml_fp16"]], "reference": [tmp_path / "unused.safetensors"]}, outputs,
                           ValidateParams(**step.params), RunContext(ws.root, step.name))
    written = json.loads(outputs["validation"].read_text())
    assert written == facts and written["validated"] == "structural" and written["passed"] is True
    assert written["not_validated"] == "structural check only: Core ML needs macOS to run" and "metrics" not in written
    assert set(written["structural_checks"]) == {"package", "deployment_target", "inputs", "outputs", "weights"}
    assert package_files(outputs["artifact"]) == package_files(packages["coreml_fp16"])


def test_a_wrong_precision_fails_the_validate_step_and_publishes_nothing(ws, packages, tmp_path: Path):
    from kiln.build_rules.validate import Validate, ValidateParams
    from kiln.errors import StepError
    from kiln.rules import RunContext

    step = step_for(ws, "coreml_fp16", "validate")  # an fp16 target handed the fp32 package
    outputs = {"artifact": tmp_path / "model.mlpackage", "validation": tmp_path / "validation.json"}
    with pytest.raises(StepError) as caught:
        Validate().run({"model": [packages["coreml_fp32"]], "reference": [tmp_path / "unused.safetensors"]}, outputs,
                       ValidateParams(**step.params), RunContext(ws.root, step.name))
    assert "is FLOAT32 in the Core ML package; a fp16 target stores its weights as FLOAT16" in str(caught.value)
    assert not any(p.exists() for p in outputs.values())


TINY_BERT = '''
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

[[outputs]]
name = "pooler_output"
shape = ["batch", 32]

[targets.c]
format = "coreml"
precision = "fp16"
max_sizes = { sequence = 64 }

[validation]
data = "data/sentences.txt"
batch_size = 8
max_length = 64
padding_mask = "attention_mask"
'''


def test_a_transformers_bert_converts_with_the_new_ones_shim(tmp_path: Path):
    """transformers 5's mask code calls Tensor.new_ones, which coremltools 9 has no converter for."""
    import sys

    from conftest import new_workspace
    from kiln.formats.coreml import Coreml
    from kiln.runtime.runners import Artifact, StructuralOnly

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sources"))
    import hf_models

    ws = new_workspace(tmp_path / "ws", {"tinybert": TINY_BERT})
    hf_models.bert(ws.root / "manifests/tiny-bert")
    package = export(ws, "c", tmp_path / "c.mlpackage", "tinybert")
    step = step_for(ws, "c", "validate", "tinybert")
    params = step.params
    with pytest.raises(StructuralOnly) as caught:
        Coreml().open_runner(Artifact(package, params["outputs"], step.name, inputs=params["inputs"], precision="fp16",
                                      output_specs=params["output_specs"], options=params["format_options"]))
    checks = caught.value.checks
    assert checks["inputs"] == {"input_ids": "INT32 [1..1024, 1..64]", "attention_mask": "INT32 [1..1024, 1..64]"}  # int64 ids as int32
    assert checks["outputs"] == {"last_hidden_state": "FLOAT32 [?, ?, 32]", "pooler_output": "FLOAT32 [?, 32]"}
    assert checks["weights"].endswith("all FLOAT16")


@pytest.mark.slow
def test_doit_builds_publishes_locks_and_reproduces_the_packages(tmp_path: Path):
    a, b = coreml_workspace(tmp_path / "a"), coreml_workspace(tmp_path / "elsewhere")
    proc = a.doit("build")
    assert "kiln: tinycnn/coreml_fp32: published structural check only: Core ML needs macOS to run" in proc.stdout + proc.stderr
    assert "has not been tested with coremltools" not in proc.stdout + proc.stderr  # coremltools' noise stays in the step log
    report = a.report("tinycnn")
    assert report["ok"] and sorted(x["target"] for x in report["artifacts"]) == ["coreml_fp16", "coreml_fp32"]
    for artifact in report["artifacts"]:
        assert artifact["passed"] is True and artifact["metrics"] is None
        assert artifact["validation"] == "structural check only: Core ML needs macOS to run"
        written = json.loads((a.root / "build/tinycnn" / artifact["target"] / "validation.json").read_text())
        assert written["validated"] == "structural"
    lock = json.loads((a.root / "build/tinycnn/kiln.lock.json").read_text())
    assert sorted(x["path"] for x in lock["artifacts"]) == ["build/tinycnn/coreml_fp16/model.mlpackage", "build/tinycnn/coreml_fp32/model.mlpackage"]
    assert [line for line in a.doit("build").stdout.splitlines() if line.startswith(".  ")] == []  # a no-op rebuild
    b.doit("build")
    for target in ("coreml_fp32", "coreml_fp16"):
        rel = f"build/tinycnn/{target}/model.mlpackage"
        assert package_files(a.root / rel) == package_files(b.root / rel), target


BATCH_FIXED = '''import torch

class MeanOverBatch(torch.nn.Module):
    def forward(self, image):
        return image.flatten(1)[:, :10] / int(image.shape[0])  # int(): the tracer keeps the example's batch

def build():
    return MeanOverBatch()
'''


def test_a_trace_fixed_to_the_examples_shapes_fails_naming_the_size_and_the_tracer_warning(tmp_path: Path):
    from kiln.errors import StepError

    ws = coreml_workspace(tmp_path / "ws", '[targets.c]\nformat = "coreml"\n')
    (ws.root / "manifests/models/tinycnn.py").write_text(BATCH_FIXED)
    with pytest.raises(StepError) as caught:
        export(ws, "c", tmp_path / "c.mlpackage")
    message = str(caught.value)
    assert message.startswith("tinycnn/c/export_coreml: the trace is specialised to the example's shapes: at batch=3 output 'logits' differs from the source's (max abs diff ")
    assert "use via = torch_export or fix the model (the tracer warned at manifests/models/tinycnn.py:5: Converting a tensor to a Python integer might cause the trace to be incorrect)" in message and "\n" not in message
    assert not (tmp_path / "c.mlpackage").exists() and not list(tmp_path.glob(".*"))


def test_the_export_reports_the_sizes_it_checked_the_trace_at(ws, tmp_path: Path):
    from kiln.rules import RunContext, get_rule

    step = step_for(ws, "coreml_fp32", "export_coreml")
    rule = get_rule("export_coreml")
    facts = rule().run({role: list(files) for role, files in step.inputs.items()}, {"model": tmp_path / "m.mlpackage"}, rule.Params(**step.params), RunContext(ws.root, step.name))
    assert facts["trace_checked_at"] == {"example": {"batch": 2}, "other": {"batch": 3}}


WEIGHTLESS = '''import torch

class Scaled(torch.nn.Module):
    def forward(self, image):
        return image.flatten(1)[:, :10] * 2.0 + 1.0  # only scalar constants: stored inline, nothing in weights/

def build():
    return Scaled()
'''


def test_a_model_without_stored_weights_has_no_empty_weights_folder_to_lose(tmp_path: Path):
    """coremltools leaves an empty weights/ folder listed in Manifest.json; a copy that drops empty
    folders made such a package unloadable. The export leaves out the folder and its item."""
    ws = coreml_workspace(tmp_path / "ws", '[targets.c]\nformat = "coreml"\n')
    (ws.root / "manifests/models/tinycnn.py").write_text(WEIGHTLESS)
    package = export(ws, "c", tmp_path / "c.mlpackage")
    assert not (package / "Data/com.apple.CoreML/weights").exists()
    items = json.loads((package / "Manifest.json").read_text())["itemInfoEntries"]
    assert [item["path"] for item in items.values()] == ["com.apple.CoreML/model.mlmodel"]
    assert not [p for p in package.rglob("*") if p.is_dir() and not any(p.iterdir())]  # no empty folder at all
    ct.models.MLModel(str(package), skip_model_load=True)
    ct.utils.load_spec(str(package))
