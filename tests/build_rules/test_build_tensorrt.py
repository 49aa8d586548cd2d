"""TensorRT targets: the plan (the ONNX of the target's precision, then the engine build and its
validation on the GPU), the manifest's profile checks, a build without a GPU that fails cleanly or
is skipped, and, where this machine has an NVIDIA GPU with TensorRT, the real bert engines.

The build step's own logic (errors that say why, the timing cache merge, the profile's shapes) is
tested against fakes of the `tensorrt` and cuda-python modules (tests/fake_gpu.py, the `gpu`
fixture): the real TensorRT can only be installed from NVIDIA's own index and no machine here has a
GPU, so the binding boundary is faked here, and only for TensorRT. Those tests show kiln's side is
right for the API as documented; none of them has run on a GPU.
"""

from __future__ import annotations

import copy
import threading
import tomllib
from pathlib import Path

import pytest

from conftest import REPO, example_workspace
from fake_gpu import installed
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
        assert named.returncode == 2 and "pip install 'kiln[tensorrt-cu13]' (NVIDIA driver >= 580) or 'kiln[tensorrt-cu12]'" in named.stderr
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


# The build step against the fake TensorRT (see the module docstring).


@pytest.fixture
def gpu(monkeypatch):
    yield from installed(monkeypatch)


def _onnx(path: Path, shape: list, name: str = "x") -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", [name], ["y"])], "g", [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def _build(root: Path, shape=("batch", 4), declared=("batch", 4), profile=None, out: str = "t"):
    from kiln.build_rules.build_tensorrt import BuildTensorrt, BuildTensorrtParams
    from kiln.rules import RunContext

    model = _onnx(root / f"{out}.onnx", list(shape))
    folder = root / "build" / out
    folder.mkdir(parents=True, exist_ok=True)
    outputs = {"engine": folder / "model.engine", "timing_cache": folder / "timing.cache"}
    params = BuildTensorrtParams(inputs=[{"name": "x", "shape": list(declared) if declared else None}], profile=profile or {"batch": [1, 2, 4]})
    return BuildTensorrt().run({"model": [model]}, outputs, params, RunContext(root, f"m/{out}/build_tensorrt")), outputs


def _shared(root: Path) -> list[Path]:
    return sorted((root / "build/.kiln/tensorrt").glob("*.timing.cache"))


def test_a_fake_build_writes_the_engine_and_the_profile_from_the_manifest(gpu, tmp_path: Path):
    facts, outputs = _build(tmp_path)
    import json

    plan = json.loads(outputs["engine"].read_bytes())
    assert plan["profile"] == {"x": [[1, 4], [2, 4], [4, 4]]}
    assert plan["network_flags"] == 1 << int(gpu.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # TensorRT 10: types from the graph
    assert plan["cleared_flags"] == [int(gpu.trt.BuilderFlag.TF32)]  # fp32 computes in fp32
    assert facts["gpu"] == "NVIDIA H200" and facts["tensorrt"] == "10.13.0.35"
    assert facts["timing_cache_start"] == "empty: no shared timing cache yet" and facts["timing_cache_merge"] == "created"
    assert gpu.cuda.state.calls.count("cudaSetDevice(0)") == 1  # the build is the first CUDA call in this process


def test_a_builder_returning_nullptr_is_a_one_line_step_error_with_the_cause(gpu, tmp_path: Path):
    gpu.trt.FAKE.create_error = TypeError("pybind11::init(): factory function returned nullptr")
    gpu.trt.FAKE.create_logs = [("WARNING", "CUDA initialization failure with error: 35. Please check your CUDA installation: http://docs.nvidia.com/cuda/")]
    with pytest.raises(StepError) as caught:
        _build(tmp_path)
    message = str(caught.value)
    assert message.startswith("m/t/build_tensorrt: TensorRT could not create its Builder (pybind11::init(): factory function returned nullptr): "
                              "warnings: CUDA initialization failure with error: 35.")
    assert "pip install 'kiln[tensorrt-cu13]'" in message and "\n" not in message
    assert not (tmp_path / "build/t/model.engine").exists()


def test_parser_errors_name_the_node_and_its_operator(gpu, tmp_path: Path):
    gpu.trt.FAKE.parse_errors = [("Assertion failed: axis >= 0", "/encoder/layer.0/attention/Softmax", "Softmax"), ("second", "", "")]
    with pytest.raises(StepError, match=r"TensorRT's ONNX parser refused t.onnx: node '/encoder/layer.0/attention/Softmax' \(Softmax\): "
                                        r"Assertion failed: axis >= 0; second$"):
        _build(tmp_path)


def test_a_failed_build_reports_the_first_and_last_error_and_relevant_warnings(gpu, tmp_path: Path):
    gpu.trt.FAKE.build_fails = True
    gpu.trt.FAKE.build_logs = [("ERROR", "[myelin] root cause: unsupported fused op"), ("WARNING", "Skipping tactic 0x1 due to insufficient memory"),
                               ("INFO", "noise"), ("ERROR", "Error Code 10: Internal Error (Could not find any implementation for node {ForeignNode})")]
    with pytest.raises(StepError) as caught:
        _build(tmp_path)
    assert str(caught.value) == ("m/t/build_tensorrt: TensorRT could not build the engine: first TensorRT error: [myelin] root cause: unsupported fused op; "
                                 "last: Error Code 10: Internal Error (Could not find any implementation for node {ForeignNode}) (2 errors); "
                                 "warnings: Skipping tactic 0x1 due to insufficient memory")


def test_builds_merge_their_timing_caches_instead_of_overwriting(gpu, tmp_path: Path):
    _build(tmp_path, out="a")
    gpu.trt.FAKE.tactic = "tactic-b"
    facts, outputs = _build(tmp_path, out="b")
    (shared,) = _shared(tmp_path)
    assert facts["timing_cache_start"].startswith("shared (") and facts["timing_cache_merge"] == "merged"
    assert shared.read_bytes() == b"FAKE-TIMING-CACHE\ntactic-a\ntactic-b\n"
    assert outputs["timing_cache"].read_bytes() == shared.read_bytes()


def test_concurrent_builds_each_keep_their_entries(gpu, tmp_path: Path, monkeypatch):
    """Two builds that started from the same (empty) shared cache: the one that finishes last
    reloads the file under the lock and keeps the other's entries (before: last writer won)."""
    from kiln.build_rules import build_tensorrt

    started, first_merged = threading.Barrier(2), threading.Event()
    real_start, real_merge = build_tensorrt._start_timing_cache, build_tensorrt._merge_into_shared

    def start(config, shared):
        found = real_start(config, shared)
        started.wait(timeout=30)  # both have read the shared cache before either merges
        return found

    def merge(config, built, shared):
        if "tactic-b" in built.entries:
            first_merged.wait(timeout=30)
        done = real_merge(config, built, shared)
        first_merged.set()
        return done

    monkeypatch.setattr(build_tensorrt, "_start_timing_cache", start)
    monkeypatch.setattr(build_tensorrt, "_merge_into_shared", merge)
    original = gpu.trt.Builder.build_serialized_network
    tactics = {"a": "tactic-a", "b": "tactic-b"}

    def build(self, network, config):
        gpu.trt.FAKE.tactic = tactics[threading.current_thread().name]
        return original(self, network, config)

    monkeypatch.setattr(gpu.trt.Builder, "build_serialized_network", build)
    gpu.trt.FAKE.tactic = None
    errors = []
    threads = [threading.Thread(target=lambda o=o: errors.append(None) if _build(tmp_path, out=o) else None, name=o) for o in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    (shared,) = _shared(tmp_path)
    assert shared.read_bytes() == b"FAKE-TIMING-CACHE\ntactic-a\ntactic-b\n"


@pytest.mark.parametrize("damage,start", [
    (lambda data: data[:-3], "empty: the shared timing cache could not be read (truncated or not a timing cache)"),
    (None, "empty: TensorRT rejected the shared timing cache (made for another GPU or TensorRT version)"),
])
def test_a_truncated_or_rejected_shared_cache_starts_empty_and_says_so(gpu, tmp_path: Path, damage, start):
    _build(tmp_path, out="a")
    (shared,) = _shared(tmp_path)
    if damage:
        shared.write_bytes(damage(shared.read_bytes()))
    else:
        gpu.trt.FAKE.reject_cache = True
    gpu.trt.FAKE.tactic = "tactic-b"
    facts, outputs = _build(tmp_path, out="b")
    assert facts["timing_cache_start"] == start
    assert outputs["timing_cache"].read_bytes() == b"FAKE-TIMING-CACHE\ntactic-b\n"
    if damage:  # the unreadable file is replaced by this build's cache
        assert facts["timing_cache_merge"] == "replaced: the shared timing cache could not be read"
    else:  # a cache from another device does not combine either (ignore_mismatch=False)
        assert facts["timing_cache_merge"] == "replaced: TensorRT would not combine the shared timing cache (another GPU or version)"
    assert shared.read_bytes() == b"FAKE-TIMING-CACHE\ntactic-b\n"


def test_the_merge_waits_for_the_lock_and_keeps_what_was_merged_meanwhile(gpu, tmp_path: Path):
    """Another process holds the shared cache's lock and merges tactic-c while this build waits:
    the build reloads the file only once it has the lock, so tactic-c survives."""
    import fcntl

    _build(tmp_path, out="a")
    (shared,) = _shared(tmp_path)
    gpu.trt.FAKE.tactic = "tactic-b"
    found: dict = {}
    with open(shared.with_name(shared.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        build = threading.Thread(target=lambda: found.update(_build(tmp_path, out="b")[0]))
        build.start()
        build.join(2)
        assert build.is_alive()  # waiting for the lock
        shared.write_bytes(b"FAKE-TIMING-CACHE\ntactic-a\ntactic-c\n")
        fcntl.flock(lock, fcntl.LOCK_UN)
    build.join(30)
    assert found["timing_cache_merge"] == "merged"
    assert shared.read_bytes() == b"FAKE-TIMING-CACHE\ntactic-a\ntactic-b\ntactic-c\n"


def test_an_axis_left_dynamic_names_the_input(gpu, tmp_path: Path):
    with pytest.raises(StepError, match=r"input 'x' axis 0 is dynamic in the ONNX model \(\[-1, 4\]\) and the manifest gives it no size"):
        _build(tmp_path, shape=("n", 4), declared=None)


@pytest.mark.parametrize("shape,declared,profile,text", [
    ((8, 4), ("batch", 4), {"batch": [1, 2, 4]}, "input 'x' axis 0: the ONNX model fixes it to 8, the manifest gives axis 'batch' with profile [1, 2, 4]"),
    (("batch", 4), ("batch", 5), None, "input 'x' axis 1: the ONNX model fixes it to 4, the manifest gives size 5"),
    (("batch", 4, 2), ("batch", 4), None, "input 'x': the manifest's shape ['batch', 4] has 2 axes, the ONNX model's [-1, 4, 2] has 3"),
])
def test_manifest_axes_are_compared_with_the_onnx_shape(gpu, tmp_path: Path, shape, declared, profile, text):
    with pytest.raises(StepError) as caught:
        _build(tmp_path, shape=shape, declared=declared, profile=profile)
    assert text in str(caught.value)


def test_an_axis_the_onnx_fixes_passes_when_the_profile_agrees(gpu, tmp_path: Path):
    facts, outputs = _build(tmp_path, shape=(4, 4), declared=("batch", 4), profile={"batch": [4, 4, 4]})
    assert outputs["engine"].stat().st_size == facts["engine_bytes"]
