"""TensorRT targets: the plan (the ONNX of the target's precision, then the engine build and its
validation on the GPU), the manifest's profile checks, a build without a GPU that fails cleanly or
is skipped, and, where this machine has an NVIDIA GPU with TensorRT, the real bert engines."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest

from conftest import REPO, example_workspace
from kiln.base.cuda import unavailable_reason
from kiln.errors import ManifestError, StepError
from kiln.schema.manifest import RawManifest
from kiln.plan.chains import plan
from kiln.define.resolve import Resolved
from kiln.define.spec import validate

GOOD = tomllib.loads((REPO / "manifests/bert_tensorrt.toml").read_text())
ROOT = Path("/ws")
RESOLVED = Resolved((Path("/site/model/config.json"), Path("/site/model/model.safetensors")), ROOT / "manifests/data/sentences.txt", ROOT / "manifests/data/calibration.txt")
NO_GPU = unavailable_reason(0)


def make_plan(change=lambda d: None):
    data = copy.deepcopy(GOOD)
    change(data)
    return plan(validate(RawManifest(ROOT / "manifests/bert_tensorrt.toml", data)), RESOLVED, ROOT / "manifests/bert_tensorrt.toml", ROOT)


def chain(p, target):
    return [s for s in p.steps if target in s.targets]


def test_each_precision_builds_from_the_onnx_of_that_precision():
    p = make_plan()
    assert [s.rule for s in chain(p, "trt_fp32")] == ["reference_outputs", "export_onnx", "simplify_onnx", "build_tensorrt", "validate"]
    assert [s.rule for s in chain(p, "trt_fp16")] == ["reference_outputs", "export_onnx", "simplify_onnx", "convert_fp16", "build_tensorrt", "validate"]
    assert [s.rule for s in chain(p, "trt_int8")] == ["reference_outputs", "export_onnx", "simplify_onnx", "calibrate", "quantize_static", "build_tensorrt", "validate"]
    quantize = chain(p, "trt_int8")[4]
    assert quantize.params["activation_type"] == "int8"  # TensorRT takes symmetric int8 activations only
    build = chain(p, "trt_fp32")[3]
    assert build.params["profile"] == {"batch": [1, 32, 32], "sequence": [1, 128, 128]} and build.params["tf32"] is False
    assert build.params["workspace_mib"] == 2048
    validate_step = chain(p, "trt_fp32")[4]
    assert validate_step.inputs["model"] == (build.outputs["engine"], build.outputs["timing_cache"])
    assert validate_step.outputs["artifact"] == ROOT / "build/bert_trt/trt_fp32/model.engine"
    assert validate_step.outputs["timing_cache"] == ROOT / "build/bert_trt/trt_fp32/timing.cache"
    assert validate_step.params["device"] == 0


def test_an_onnx_target_asking_for_the_same_fp16_shares_the_conversion():
    def add(d):
        d["targets"]["onnx_fp16"] = {"format": "onnx", "precision": "fp16"}
    p = make_plan(add)
    (convert,) = [s for s in p.steps if s.rule == "convert_fp16"]
    assert convert.targets == ["trt_fp16", "onnx_fp16"]


def _target(change):
    def mutate(d):
        change(d["targets"]["trt_fp32"])
    return mutate


@pytest.mark.parametrize("change,key,text", [
    (_target(lambda t: t["profile"].pop("sequence")), "targets.trt_fp32.profile", "'sequence' is missing"),
    (_target(lambda t: t["profile"].__setitem__("batch", [8, 4, 32])), "targets.trt_fp32.profile.batch", "min <= opt <= max"),
    (_target(lambda t: t["profile"].__setitem__("width", [1, 2, 3])), "targets.trt_fp32.profile.width", "an axis named in the [[inputs]] shapes"),
    (_target(lambda t: t["profile"].__setitem__("batch", [1, 8])), "targets.trt_fp32.profile.batch", "at least 3 items"),
    (_target(lambda t: t.__setitem__("hardware", "cpu")), "targets.trt_fp32.hardware", "expected 'cuda'"),
    (_target(lambda t: t.__setitem__("precision", "int4")), "targets.trt_fp32.precision", "'int4' is not allowed"),
    (_target(lambda t: t["options"].__setitem__("percentile", 99.9)), "targets.trt_fp32.options.percentile", "applies to precision = \"int8\" only"),
    (lambda d: d.pop("calibration"), "targets.trt_int8.precision", "a [calibration] table"),
])
def test_bad_tensorrt_targets_name_the_key(change, key, text):
    data = copy.deepcopy(GOOD)
    change(data)
    with pytest.raises(ManifestError) as caught:
        validate(RawManifest(Path("/ws/manifests/bert_tensorrt.toml"), data))
    message = str(caught.value)
    assert f"bert_tensorrt.toml: {key}: " in message and text in message and "\n" not in message


@pytest.mark.skipif(NO_GPU is None, reason="this machine can build TensorRT engines")
def test_without_a_gpu_the_build_step_fails_and_writes_nothing(tmp_path: Path):
    from kiln.build_rules.build_tensorrt import BuildTensorrt, BuildTensorrtParams
    from kiln.rules import RunContext

    outputs = {"engine": tmp_path / "model.engine", "timing_cache": tmp_path / "timing.cache"}
    params = BuildTensorrtParams(inputs=[{"name": "x", "shape": ["batch", 4]}], profile={"batch": [1, 2, 4]})
    with pytest.raises(StepError, match="a TensorRT engine is built on an NVIDIA GPU, and this machine cannot: ") as caught:
        BuildTensorrt().run({"model": [tmp_path / "m.onnx"]}, outputs, params, RunContext(tmp_path, "m/t/build_tensorrt"))
    assert NO_GPU in str(caught.value)
    assert list(tmp_path.iterdir()) == []
    assert BuildTensorrt.hardware_for(params.model_dump()) == {"unavailable": NO_GPU}  # in the key: a GPU appearing rebuilds


@pytest.mark.skipif(NO_GPU is None, reason="this machine can build TensorRT engines")
def test_a_whole_repository_build_skips_gpu_targets_and_a_named_one_fails(tmp_path: Path):
    ws = example_workspace(tmp_path / "ws", "bert_tensorrt", "sklearn_iris")
    proc = ws.doit("build")  # every manifest: the GPU targets are left out, the rest builds
    assert "kiln: skipped bert_trt/trt_fp16: hardware = \"cuda\" needs an NVIDIA GPU with TensorRT: " in proc.stderr
    assert ws.report("sklearn_iris")["ok"] and not (ws.root / "build/bert_trt").exists()
    verified = ws.kiln("verify")  # nothing of bert_tensorrt was built here, and that is not drift
    assert verified.returncode == 0 and "bert_tensorrt.toml: skipped: 3 targets cannot be built on this machine" in verified.stdout
    named = ws.doit("build", "manifest=bert_tensorrt", check=False)
    assert named.returncode != 0 and not (ws.root / "build/bert_trt/trt_fp32").exists()
    if "tensorrt" in NO_GPU:  # the package is missing: refused before any step runs, with the command
        assert named.returncode == 2 and "pip install 'kiln[tensorrt]'" in named.stderr
    else:
        assert "a TensorRT engine is built on an NVIDIA GPU, and this machine cannot" in named.stdout + named.stderr


@pytest.mark.slow
@pytest.mark.skipif(NO_GPU is not None, reason=f"no TensorRT GPU here: {NO_GPU}")
def test_bert_engines_build_and_validate_on_the_gpu(tmp_path: Path):
    ws = example_workspace(tmp_path / "ws", "bert_tensorrt")
    ws.doit("build", "manifest=bert_tensorrt")
    report = ws.report("bert_trt")
    assert report["ok"]
    for artifact in report["artifacts"]:
        assert (ws.root / "build/bert_trt" / artifact["target"] / "model.engine").stat().st_size > 0
        assert (ws.root / "build/bert_trt" / artifact["target"] / "timing.cache").stat().st_size > 0
    shared = list((ws.root / "build/.kiln/tensorrt").glob("*.timing.cache"))
    assert len(shared) == 1 and shared[0].stat().st_size > 0
    assert [line for line in ws.doit("build", "manifest=bert_tensorrt").stdout.splitlines() if line.startswith(".  ")] == []
