"""The TensorRT runner (kiln.formats.tensorrt.open_runner) and TensorRT's fp32 gate.

The runner is tested against fakes of the `tensorrt` and cuda-python modules (tests/fake_gpu.py):
the real TensorRT can only be installed from NVIDIA's own index and no machine here has a GPU, so
the binding boundary is faked here, and only for TensorRT. The fakes copy real bytes through kiln's
device buffers, but none of this has run on a GPU.
"""

from __future__ import annotations

import copy
import gc
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from fake_gpu import installed
from kiln.errors import StepError
from kiln.formats import target_format
from kiln.runtime.runners import Artifact, close_runner


@pytest.fixture
def gpu(monkeypatch):
    yield from installed(monkeypatch, devices=[["NVIDIA H200", 9, 0], ["NVIDIA H200", 9, 0]])


def _engine(path: Path) -> Path:
    """An engine of the fake TensorRT: input x (float32, [batch, 4], batch 1..8), output y = 2x + 1."""
    path.write_bytes(json.dumps({"inputs": [["x", 0]], "outputs": ["y"], "profile": {"x": [[1, 4], [4, 4], [8, 4]]}}).encode())
    return path


def _open(path: Path, device: int = 0):
    return target_format("tensorrt").open_runner(Artifact(path, ["y"], "m/t/validate", device=device))


def test_the_runner_copies_through_device_memory_and_frees_it_on_close(gpu, tmp_path: Path):
    run = _open(_engine(tmp_path / "model.engine"))
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(run({"x": x})["y"], 2 * x + 1)
    state = gpu.cuda.state
    assert len(state.allocations) == 2 and len(state.streams) == 1 and gpu.trt.FAKE.live == {"engine": 1, "context": 1}
    assert state.native_handle_calls == 1 and state.int_calls == 0  # get_cuda_native_handle, not int(stream)
    close_runner(run)
    assert state.allocations == {} and state.streams == set() and gpu.trt.FAKE.live == {"engine": 0, "context": 0}
    with pytest.raises(StepError, match="the TensorRT runner was closed"):
        run({"x": x})


def test_a_runner_dropped_without_close_is_freed(gpu, tmp_path: Path):
    run = _open(_engine(tmp_path / "model.engine"))
    run({"x": np.ones((1, 4), np.float32)})
    del run
    gc.collect()
    assert gpu.cuda.state.allocations == {} and gpu.cuda.state.streams == set() and gpu.trt.FAKE.live == {"engine": 0, "context": 0}


def test_the_engine_is_deserialized_on_the_targets_device(gpu, tmp_path: Path):
    run = _open(_engine(tmp_path / "model.engine"), device=1)
    assert gpu.trt.FAKE.deserialized_on == [1]  # cudaSetDevice came before trt.Runtime
    run({"x": np.ones((2, 4), np.float32)})
    assert {device for _, device in gpu.cuda.state.allocations.values()} == {1}
    close_runner(run)


def test_no_execution_context_is_a_step_error_and_frees_the_buffers(gpu, tmp_path: Path):
    gpu.trt.FAKE.context_none = True
    with pytest.raises(StepError, match=r"^m/t/validate: TensorRT could not create an execution context for model.engine on device 0 \(out of GPU memory\?\)$"):
        _open(_engine(tmp_path / "model.engine"))
    assert gpu.cuda.state.streams == set() and gpu.trt.FAKE.live["engine"] == 0


def test_a_runtime_returning_nullptr_says_why(gpu, tmp_path: Path):
    gpu.trt.FAKE.create_error = TypeError("pybind11::init(): factory function returned nullptr")
    gpu.trt.FAKE.create_logs = [("ERROR", "CUDA initialization failure with error: 3")]
    with pytest.raises(StepError, match=r"TensorRT could not create its Runtime \(pybind11::init\(\): factory function returned nullptr\): "
                                        r"TensorRT error: CUDA initialization failure with error: 3$"):
        _open(_engine(tmp_path / "model.engine"))
    assert gpu.cuda.state.streams == set()


def test_an_engine_that_does_not_load_and_a_shape_outside_the_profile(gpu, tmp_path: Path):
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"\x00not an engine")
    with pytest.raises(StepError, match="TensorRT cannot load bad.engine"):
        _open(bad)
    run = _open(_engine(tmp_path / "model.engine"))
    with pytest.raises(StepError, match=r"input 'x' of shape \[9, 4\] is outside the engine's optimization profile"):
        run({"x": np.ones((9, 4), np.float32)})
    close_runner(run)


def _thresholds(change=lambda d: None):
    from kiln.define.spec import effective_thresholds, validate
    from kiln.schema.manifest import RawManifest

    data = copy.deepcopy(tomllib.loads((REPO / "manifests/bert_tensorrt.toml").read_text()))
    data["targets"]["onnx_fp32"] = {"format": "onnx", "precision": "fp32"}
    change(data)
    spec = validate(RawManifest(Path("/ws/manifests/bert_tensorrt.toml"), data))
    return {name: effective_thresholds(spec, name) for name in ("trt_fp32", "trt_fp16", "onnx_fp32")}


def test_tensorrt_fp32_gates_max_abs_diff_at_1e_3_and_keeps_the_cosines():
    found = _thresholds()
    assert found["trt_fp32"].max_abs_diff == 1e-3  # GPU fp32 kernels (published figures: kiln.formats.tensorrt)
    assert found["onnx_fp32"].max_abs_diff == 1e-4  # CPU formats keep the measured gate
    assert (found["trt_fp32"].min_cosine, found["trt_fp32"].mean_cosine) == (found["onnx_fp32"].min_cosine, found["onnx_fp32"].mean_cosine) == (0.9999, 0.99999)
    assert found["trt_fp16"].max_abs_diff is None


def test_the_manifests_thresholds_still_win_over_the_tensorrt_default():
    def tighten(data):
        data["targets"]["trt_fp32"]["thresholds"] = {"max_abs_diff": 2e-4}
        data["validation"]["thresholds"] = {"max_abs_diff": 5e-4}
    found = _thresholds(tighten)
    assert found["trt_fp32"].max_abs_diff == 2e-4 and found["onnx_fp32"].max_abs_diff == 5e-4
