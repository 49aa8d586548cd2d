"""kiln.base.cuda: device facts from a probe subprocess (never CUDA in the planning process, which
doit forks), the driver/CUDA-major mismatch in one line, TensorRT's log as one-line errors, and the
extras per CUDA major.

These tests run against fakes of the `tensorrt` and cuda-python modules (tests/fake_gpu.py): the
real TensorRT can only be installed from NVIDIA's own index and no machine here has a GPU, so the
binding boundary is faked here, and only for TensorRT. Nothing in this file has run on a GPU.
"""

from __future__ import annotations

import os
import sys
import tomllib

import pytest

from conftest import REPO
from fake_gpu import configure, installed
from kiln.base import cuda
from kiln.base.cuda import CudaUnavailable, TensorrtLog, create, device_facts, unavailable_reason


@pytest.fixture
def gpu(monkeypatch):
    yield from installed(monkeypatch, devices=[["NVIDIA H200", 9, 0], ["NVIDIA A100-SXM4-80GB", 8, 0]], driver=13000)


def _child_status(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _fork_and_set_device(rt) -> int:
    """Fork; the child makes a CUDA call that needs a context, as a doit worker's step does."""
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 when its CUDA call works
        err, *_ = rt.cudaSetDevice(0)
        os._exit(int(err))
    return _child_status(pid)


def test_facts_come_from_a_probe_so_a_forked_worker_can_still_use_cuda(gpu):
    assert device_facts(0) == {"gpu": "NVIDIA H200", "compute_capability": "9.0", "cuda_driver": 13000, "tensorrt": "10.13.0.35"}
    assert device_facts(1)["gpu"] == "NVIDIA A100-SXM4-80GB" and unavailable_reason(0) is None
    assert gpu.cuda.state.initialised_pid is None and gpu.cuda.state.calls == []  # not one CUDA call in this process
    assert _fork_and_set_device(gpu.cuda) == 0  # what `doit -n N` does after planning


def test_the_fake_driver_fails_a_child_forked_after_cuda_started(gpu):
    """The control for the test above: had the facts come from cudaGetDeviceCount in this process
    (kiln before the probe), the forked worker's first CUDA call would fail as on a real driver."""
    assert int(gpu.cuda.cudaGetDeviceCount()[0]) == 0
    assert _fork_and_set_device(gpu.cuda) == 3  # cudaErrorInitializationError


def test_the_probe_runs_once_per_process(gpu, monkeypatch):
    calls = []
    real = cuda.subprocess.run
    monkeypatch.setattr(cuda.subprocess, "run", lambda *a, **k: calls.append(a) or real(*a, **k))
    device_facts(0), device_facts(1), unavailable_reason(5), cuda.tensorrt_version()
    assert len(calls) == 1 and calls[0][0][:2] == [sys.executable, "-c"]


def test_a_driver_older_than_the_cuda_major_names_both_in_one_line(gpu, monkeypatch):
    configure(monkeypatch, driver=12040, runtime=13000, count_error=35)
    reason = unavailable_reason(0)
    assert reason == ("the NVIDIA driver supports CUDA 12.4, older than the CUDA 13 that cuda-python 13.0.1 and TensorRT 10.13.0.35 "
                      "(CUDA 13 wheels) are built for (cudaErrorInsufficientDriver): pip install 'kiln[tensorrt-cu12]' to match the "
                      "driver, or upgrade the driver (CUDA 13 needs >= 580)")


def test_no_gpu_and_a_missing_device_say_so(gpu, monkeypatch):
    assert unavailable_reason(2) == "CUDA device 2 was asked for but 2 device(s) found"
    configure(monkeypatch, count_error=100)
    assert unavailable_reason(0) == "no usable NVIDIA GPU (cudaGetDeviceCount failed: cudaErrorNoDevice)"


def test_no_driver_at_all_is_not_called_a_driver_too_old(gpu, monkeypatch):
    """Where no NVIDIA driver is installed, CUDA's runtime also answers cudaErrorInsufficientDriver,
    and cudaDriverGetVersion gives 0: that is no GPU, not "install tensorrt-cu12"."""
    configure(monkeypatch, driver=0, runtime=13000, count_error=35)
    assert unavailable_reason(0) == ("no usable NVIDIA GPU (no NVIDIA driver found: cudaDriverGetVersion gave 0 and cudaGetDeviceCount "
                                     "failed: cudaErrorInsufficientDriver)")


def test_an_exception_from_the_bindings_is_a_reason_from_the_probe(gpu, monkeypatch):
    """cuda-python 12 raises RuntimeError where it cannot dlopen libcuda; the probe reports it as data."""
    configure(monkeypatch, raises="Failed to dlopen libcuda.so.1")
    assert unavailable_reason(0) == "no usable NVIDIA GPU (cudaGetDeviceCount failed: RuntimeError: Failed to dlopen libcuda.so.1)"
    assert cuda.tensorrt_version() == "10.13.0.35"  # the probe still answered


def test_the_probe_ignores_stray_output_and_a_tensorrt_py_in_the_working_directory(gpu, monkeypatch, tmp_path):
    (tmp_path / "tensorrt.py").write_text("raise ImportError('the working directory shadowed tensorrt')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cuda, "PROBE", "print('libfoo: banner on stdout')\n" + cuda.PROBE + "\nprint('an atexit line')\n")
    assert device_facts(0)["tensorrt"] == "10.13.0.35"


def test_a_failing_probe_runs_once_and_every_caller_gets_its_reason(gpu, monkeypatch):
    """A probe that crashes (or times out, PROBE_TIMEOUT_S each) must not run again for every step key."""
    calls = []
    real = cuda.subprocess.run
    monkeypatch.setattr(cuda.subprocess, "run", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(cuda, "PROBE", "import sys; sys.exit('Segmentation fault in libcuda')")
    reasons = {unavailable_reason(0), unavailable_reason(1), unavailable_reason(0)}
    assert len(reasons) == 1 and "failed with exit code 1: Segmentation fault in libcuda" in reasons.pop()
    assert cuda.tensorrt_version().startswith("unknown (the CUDA/TensorRT probe") and len(calls) == 1


def test_without_tensorrt_no_probe_runs(monkeypatch):
    monkeypatch.setattr(cuda.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(cuda.subprocess, "run", lambda *a, **k: pytest.fail("probed without tensorrt"))
    cuda.probe_outcome.cache_clear()
    cuda.device_facts.cache_clear()
    try:
        assert unavailable_reason(0) == f"the tensorrt package is not installed ({cuda.INSTALL})"
        assert cuda.tensorrt_version() == "not installed"
    finally:
        cuda.probe_outcome.cache_clear()
        cuda.device_facts.cache_clear()


@pytest.mark.parametrize("script,said", [
    ("import sys; sys.exit('Segmentation fault in libcuda')", "exit code 1: Segmentation fault in libcuda"),
    ("import sys; sys.stderr.buffer.write(b'libnvinfer: \\xff\\xfe bad bytes\\n'); sys.exit(3)", "exit code 3: libnvinfer: \ufffd\ufffd bad bytes"),
    ("print('no answer at all')", "exit code 0: no output"),
    ("print('KILN-PROBE {not json')", None),
])
def test_a_probe_that_crashes_is_a_reason_not_a_traceback(gpu, monkeypatch, script, said):
    monkeypatch.setattr(cuda, "PROBE", script)
    with pytest.raises(CudaUnavailable) as caught:
        cuda.probe()
    ending = f"-c ...) failed with {said}" if said else "-c ...) answered with something that is not JSON: KILN-PROBE {not json"
    assert str(caught.value).endswith(ending)


def test_the_validate_key_holds_tensorrt_version_not_the_metapackages(gpu):
    """Installing tensorrt-cu13 directly leaves no `tensorrt` distribution: its metadata says
    nothing, tensorrt.__version__ does (the fake installs no `tensorrt` distribution at all)."""
    from importlib import metadata

    from kiln.base.tools import tool_version

    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("tensorrt")
    assert tool_version("tensorrt") == "10.13.0.35"


def test_native_handle_prefers_get_cuda_native_handle(gpu):
    stream = gpu.cuda.cudaStreamCreate()[1]
    assert cuda.native_handle(stream) == stream.getPtr()
    assert gpu.cuda.state.native_handle_calls == 1 and gpu.cuda.state.int_calls == 0


def test_native_handle_falls_back_to_int_for_a_type_the_bindings_do_not_know(gpu):
    class Stream:  # what an older cuda-bindings hands out, with no handle getter registered for it
        def __int__(self):
            return 4242

    assert cuda.native_handle(Stream()) == 4242


def test_device_buffers_free_everything_once(gpu):
    import numpy as np

    buffers = cuda.DeviceBuffers(1)
    assert gpu.cuda.state.current_device == 1
    x = np.arange(6, dtype=np.int64)
    y = np.empty_like(x)
    buffers.upload("x", x)
    buffers.download("x", y)
    assert (x == y).all() and len(gpu.cuda.state.allocations) == 1 and len(gpu.cuda.state.streams) == 1
    buffers.close()
    buffers.close()
    assert gpu.cuda.state.allocations == {} and gpu.cuda.state.streams == set()


def test_the_log_keeps_first_and_last_error_and_a_bounded_few_warnings():
    log = TensorrtLog()
    for i in range(50):
        log.add("warning", f"CUDA lazy loading is not enabled ({i})")
        log.add("info", "ignored")
    log.add("error", "[graphShapeAnalyzer.cpp::analyzeShapes::2084] Error Code 4: Miscellaneous (IShuffleLayer: reshape changes volume)")
    log.add("error", "  [network.cpp::validate::3026] Error Code 4:\n Internal Error (could not find any implementation)")
    assert len(log.warnings) == cuda.KEEP_WARNINGS
    summary = log.summary()
    assert summary.startswith("first TensorRT error: [graphShapeAnalyzer.cpp::analyzeShapes::2084]")
    assert "; last: [network.cpp::validate::3026] Error Code 4: Internal Error (could not find any implementation) (2 errors)" in summary
    assert "\n" not in summary and summary.count("CUDA lazy loading") == 3


class _Fail(Exception):
    pass


def _fail(message):
    raise _Fail(message)


def test_a_factory_returning_nullptr_is_one_line_with_the_logged_cause():
    log = TensorrtLog()

    def builder():
        log.add("warning", "CUDA initialization failure with error: 35. Please check your CUDA installation")
        raise TypeError("pybind11::init(): factory function returned nullptr")

    with pytest.raises(_Fail) as caught:
        create(builder, "Builder", log, _fail)
    message = str(caught.value)
    assert message.startswith("TensorRT could not create its Builder (pybind11::init(): factory function returned nullptr): warnings: CUDA initialization failure with error: 35")
    assert message.endswith(f"the NVIDIA driver is older than the CUDA major this TensorRT is built for: {cuda.INSTALL}")
    with pytest.raises(_Fail, match=r"could not create its Runtime \(it returned None\); TensorRT logged nothing"):
        create(lambda: None, "Runtime", TensorrtLog(), _fail)


def test_the_extras_named_in_messages_exist_per_cuda_major():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["tensorrt-cu13"] == ["tensorrt-cu13>=10.13", "cuda-python>=13"]
    assert extras["tensorrt-cu12"] == ["tensorrt-cu12>=10.0", "cuda-python>=12.6.1,<13"]  # 12.6.1: the first with cuda.bindings
    assert extras["tensorrt"] == extras["tensorrt-cu13"]  # the old name, an alias
    for named in ("tensorrt-cu13", "tensorrt-cu12"):
        assert f"'kiln[{named}]'" in cuda.INSTALL
