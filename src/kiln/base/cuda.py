"""NVIDIA GPUs, for TensorRT steps: is one usable here, what is it, device memory for a runner, and
TensorRT's log turned into one-line errors.

Two rules shape this module.

- The planning process never initialises CUDA. CUDA is not fork-safe: once a process has made a CUDA
  call that initialises the driver (cudaGetDeviceCount does), a child forked from it fails its first
  CUDA call with cudaErrorInitializationError, and `doit -n N` forks its workers after planning. So
  the facts planning and step keys need (GPU name, compute capability, driver and TensorRT
  versions) come from a probe: `python -c PROBE` in a subprocess, its JSON read once per process
  (`probe()`; a failure is kept as well). Only a step's own run (in the worker) touches CUDA
  in-process, through `cudart()`. NVML was the other way offered; the probe is used instead
  because NVML numbers GPUs in PCI order while CUDA's default order is fastest-first (so NVML's
  device 1 need not be CUDA's device 1), and NVML says a GPU is there even when cuda-python's CUDA
  major is newer than the driver (error 35), which the probe finds by making the very calls the
  step will make.
- Nothing imports a CUDA library or tensorrt at import time: planning a CPU-only build never pays for
  it, and a machine without a GPU gets a reason, not a crash.

cuda-python's runtime calls return (error, value...) tuples; `check` unwraps them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from typing import Any, Callable

# One extra per CUDA major (pyproject.toml): the driver decides which one works.
INSTALL = "pip install 'kiln[tensorrt-cu13]' (NVIDIA driver >= 580) or 'kiln[tensorrt-cu12]' (older drivers)"
INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver: the driver is older than the CUDA the bindings were built for
PROBE_TIMEOUT_S = 120  # importing tensorrt maps ~1 GB of libraries; a cold disk can take a while

# Runs in a subprocess (see the module docstring): imports tensorrt and cuda-python there, makes the
# CUDA calls planning needs, prints one JSON line after MARKER (so stray output from the libraries is
# ignored). Errors are data, never a traceback: a failed call is an error code, and an exception from
# the bindings (cuda-python 12 raises RuntimeError when it cannot dlopen libcuda) is recorded as such.
MARKER = "KILN-PROBE "
PROBE = r"""
import sys
if sys.path and sys.path[0] == "":
    del sys.path[0]  # `python -c` puts the working directory first: a tensorrt.py or cuda/ there must not shadow the install
import json
from importlib import metadata

def version(*names):
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return None

def error_name(err):
    return str(getattr(err, "name", err))

def cuda_facts(out):
    try:
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            from cuda import cudart as rt
    except ImportError:
        out["cuda_error"] = {"call": "import", "code": -1, "name": "cuda-python is not installed"}
        return
    call = "cudaDriverGetVersion"
    try:
        err, value = rt.cudaDriverGetVersion()  # initialises nothing: works when the driver is too old (0: no driver)
        out["cuda_driver"] = int(value) if int(err) == 0 else None
        call = "cudaRuntimeGetVersion"
        err, value = rt.cudaRuntimeGetVersion()
        out["cuda_runtime"] = int(value) if int(err) == 0 else None
        call = "cudaGetDeviceCount"
        err, count = rt.cudaGetDeviceCount()
        if int(err) != 0:
            out["cuda_error"] = {"call": call, "code": int(err), "name": error_name(err)}
            return
        call = "cudaGetDeviceProperties"
        devices = []
        for ordinal in range(int(count)):
            err, props = rt.cudaGetDeviceProperties(ordinal)
            if int(err) != 0:
                devices.append({"error": "cudaGetDeviceProperties failed: " + error_name(err)})
                continue
            name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
            devices.append({"gpu": name.split("\x00")[0].strip(), "compute_capability": f"{props.major}.{props.minor}"})
        out["devices"] = devices
    except Exception as err:
        out["cuda_error"] = {"call": call, "code": -2, "name": " ".join(f"{type(err).__name__}: {err}".split())[:300]}

out = {"cuda_python": version("cuda-bindings", "cuda-python")}
try:
    import tensorrt
    out["tensorrt"] = str(tensorrt.__version__)
except Exception as err:  # ImportError, or a broken install's OSError from loading libnvinfer
    out["tensorrt_error"] = " ".join(f"{type(err).__name__}: {err}".split())[:300]
out["tensorrt_cuda"] = next((major for major in (13, 12) if version(f"tensorrt-cu{major}-bindings", f"tensorrt-cu{major}-libs", f"tensorrt-cu{major}")), None)
cuda_facts(out)
print("KILN-PROBE " + json.dumps(out), flush=True)
"""


class CudaUnavailable(Exception):
    """This machine cannot run CUDA work; str() says what is missing (a package, a driver, a GPU)."""


def cudart():
    """cuda-python's runtime module (cuda.bindings.runtime since 12.6; cuda.cudart before). Importing it
    initialises nothing; call it only where CUDA work is about to run (a step's run, a runner)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise CudaUnavailable(f"the cuda-python package is not installed ({INSTALL})") from None
    return runtime


def check(result: Any, what: str) -> Any:
    """Unwrap a cuda-python (error, values...) tuple; raise CudaUnavailable naming the call."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise CudaUnavailable(f"{what} failed: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else tuple(values)


def native_handle(obj: Any) -> int:
    """The integer handle of a cuda-python object (a stream): cuda-bindings 13 deprecates int(obj) in
    favour of cuda.bindings.utils.get_cuda_native_handle; older bindings only have int()."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    try:
        return int(get_cuda_native_handle(obj))
    except TypeError:  # "Unknown type": a type this release registers no handle getter for
        return int(obj)


@functools.cache
def probe_outcome() -> tuple[dict[str, Any] | None, str | None]:
    """(what the probe found, None) or (None, why it could not run), once per process: a failure is
    cached too, so a probe that crashes or times out is not re-run (PROBE_TIMEOUT_S each) for every
    step key and every target planning asks about. Forked doit workers inherit the answer; the
    parent never initialises CUDA. No subprocess when tensorrt is not installed."""
    if importlib.util.find_spec("tensorrt") is None:
        return None, f"the tensorrt package is not installed ({INSTALL})"
    command = f"the CUDA/TensorRT probe ({sys.executable} -c ...)"
    try:
        done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, errors="replace",
                              timeout=PROBE_TIMEOUT_S, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return None, f"{command} did not answer within {PROBE_TIMEOUT_S} s"
    except OSError as err:
        return None, f"{command} could not start: {err}"
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MARKER):
            try:
                return json.loads(line[len(MARKER):]), None
            except json.JSONDecodeError:
                return None, f"{command} answered with something that is not JSON: {' '.join(line.split())[:200]}"
    said = " ".join((done.stderr.strip().splitlines() or ["no output"])[-1].split())[:300]
    return None, f"{command} failed with exit code {done.returncode}: {said}"


# Where probe() gets its answer when not from this machine: a function returning a probe-shaped
# dict ({"tensorrt", "cuda_driver", "devices": [{"gpu", "compute_capability"}]}) or raising
# CudaUnavailable with one line. The Ray executor installs the cluster's GPU pool here on the head
# (kiln.execute.ray_executor.use_cluster_gpu_facts), so step keys, the TensorRT version in keys and
# planning's "can this target be built" all describe the GPU the steps will run on, not the head's
# (which usually has none). A setting rather than a call because kiln.base sits below kiln.execute.
_probe_source: Callable[[], dict[str, Any]] | None = None


def set_probe_source(source: Callable[[], dict[str, Any]] | None) -> None:
    """Answer probe() with source() instead of this machine's probe (None: this machine again).
    Clears what was cached from the other answer."""
    global _probe_source
    if source is _probe_source:
        return
    _probe_source = source
    device_facts.cache_clear()


def probe_source() -> Callable[[], dict[str, Any]] | None:
    """The installed source (None: facts are this machine's): set on a head whose CUDA/TensorRT work
    runs on other machines, which therefore needs neither tensorrt nor a GPU to plan it."""
    return _probe_source


def probe() -> dict[str, Any]:
    """What the probe subprocess found (PROBE; see probe_outcome), or CudaUnavailable saying why
    there is no answer (tensorrt not installed, the probe crashed or timed out). With a source
    installed (set_probe_source), its answer instead."""
    if _probe_source is not None:
        return _probe_source()
    found, failure = probe_outcome()
    if failure is not None:
        raise CudaUnavailable(failure)
    return found


def _cuda_version(value: int | None) -> str:
    """CUDA's integer versions (12040) as people write them (12.4)."""
    return "unknown" if value is None else f"{value // 1000}.{value % 1000 // 10}"


def mismatch_reason(found: dict[str, Any]) -> str:
    """One line for cudaErrorInsufficientDriver: the driver's CUDA, and the CUDA major that
    cuda-python and TensorRT were built for, with the extra that matches the driver."""
    driver = found.get("cuda_driver")
    built_for = (found.get("cuda_runtime") or 0) // 1000 or found.get("tensorrt_cuda")
    trt = f"TensorRT {found['tensorrt']} (CUDA {found['tensorrt_cuda']} wheels)" if found.get("tensorrt") and found.get("tensorrt_cuda") else f"TensorRT {found.get('tensorrt', '?')}"
    fits = "tensorrt-cu12" if driver is not None and driver < 13000 else "tensorrt-cu13"
    return (f"the NVIDIA driver supports CUDA {_cuda_version(driver)}, older than the CUDA {built_for or '?'} that cuda-python "
            f"{found.get('cuda_python') or '?'} and {trt} are built for (cudaErrorInsufficientDriver): "
            f"pip install 'kiln[{fits}]' to match the driver, or upgrade the driver (CUDA 13 needs >= 580)")


@functools.cache
def device_facts(ordinal: int) -> dict[str, Any]:
    """What a TensorRT engine is specific to: GPU name, compute capability, driver and TensorRT
    versions, from the probe (no CUDA call in this process). Cached per process (asked by every
    up-to-date check of a TensorRT step)."""
    found = probe()
    if "tensorrt" not in found:
        raise CudaUnavailable(f"the tensorrt package does not import ({found.get('tensorrt_error', 'unknown error')}; {INSTALL})")
    error = found.get("cuda_error")
    if error:
        if error["code"] == -1:
            raise CudaUnavailable(f"the cuda-python package is not installed ({INSTALL})")
        if error["code"] == INSUFFICIENT_DRIVER and found.get("cuda_driver") == 0:
            # cudaDriverGetVersion gives 0 where no NVIDIA driver is installed, and the runtime then
            # reports the same error 35 as for a driver that is too old
            raise CudaUnavailable(f"no usable NVIDIA GPU (no NVIDIA driver found: cudaDriverGetVersion gave 0 and {error['call']} "
                                  f"failed: {error['name']})")
        if error["code"] == INSUFFICIENT_DRIVER:
            raise CudaUnavailable(mismatch_reason(found))
        raise CudaUnavailable(f"no usable NVIDIA GPU ({error['call']} failed: {error['name']})")
    devices = found.get("devices", [])
    if ordinal >= len(devices):
        raise CudaUnavailable(f"CUDA device {ordinal} was asked for but {len(devices)} device(s) found")
    device = devices[ordinal]
    if "error" in device:
        raise CudaUnavailable(f"CUDA device {ordinal}: {device['error']}")
    return {"gpu": device["gpu"], "compute_capability": device["compute_capability"], "cuda_driver": found.get("cuda_driver"), "tensorrt": found["tensorrt"]}


def tensorrt_version() -> str:
    """tensorrt.__version__ (from the probe), for step keys: the `tensorrt` distribution is only a
    metapackage, absent when tensorrt-cu12/-cu13 is installed directly, so its metadata cannot say."""
    try:
        found = probe()
    except CudaUnavailable as err:
        return "not installed" if "not installed" in str(err) else f"unknown ({err})"
    return found.get("tensorrt") or f"not importable ({found.get('tensorrt_error', 'unknown error')})"


def unavailable_reason(ordinal: int) -> str | None:
    """None when device `ordinal` can build and run TensorRT engines here, else why not."""
    try:
        device_facts(ordinal)
    except CudaUnavailable as err:
        return str(err)
    return None


class DeviceBuffers:
    """Device memory and a stream for a runner's tensors on one GPU, grown when a batch needs more;
    freed by close() (idempotent). Creating it makes `ordinal` the thread's current device, which
    TensorRT deserializes engines onto: create it before the engine."""

    def __init__(self, ordinal: int):
        self.rt = cudart()
        self.ordinal = ordinal
        self.activate()
        self.stream = check(self.rt.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)
        self.closed = False

    def activate(self) -> None:
        """Make this GPU the calling thread's current device (CUDA's current device is per thread)."""
        check(self.rt.cudaSetDevice(self.ordinal), "cudaSetDevice")

    def pointer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                check(self.rt.cudaFree(ptr), "cudaFree")
            ptr = int(check(self.rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def upload(self, name: str, array) -> int:
        ptr = self.pointer(name, array.nbytes)
        check(self.rt.cudaMemcpy(ptr, array.ctypes.data, array.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice), "cudaMemcpy to device")
        return ptr

    def download(self, name: str, array) -> None:
        ptr, _ = self._buffers[name]
        check(self.rt.cudaMemcpy(array.ctypes.data, ptr, array.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy to host")

    def synchronize(self) -> None:
        check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for ptr, _ in self._buffers.values():
            self.rt.cudaFree(ptr)
        self._buffers.clear()
        self.rt.cudaStreamDestroy(self.stream)


# TensorRT's log, kept for errors. Which warnings matter when something fails: those about CUDA
# itself (some releases log "CUDA initialization failure with error: 35" as a WARNING), unsupported
# layers, and failures.
RELEVANT_WARNING = ("cuda", "driver", "fail", "unsupported", "not supported", "insufficient", "error")
KEEP_WARNINGS = 8  # bounded: a build can log thousands of lines
MESSAGE_CHARS = 300


class TensorrtLog:
    """What a TensorRT logger saw that an error should repeat: the first and the last ERROR (a failed
    build often logs its root cause before a generic last line), how many, and the first few
    relevant WARNINGs. Fed by `logger(trt)`, a tensorrt.ILogger subclass instance."""

    def __init__(self):
        self.first_error = ""
        self.last_error = ""
        self.errors = 0
        self.warnings: list[str] = []

    def add(self, level: str, message: str) -> None:
        text = " ".join(str(message).split())[:MESSAGE_CHARS]
        if level == "error":
            self.errors += 1
            self.first_error = self.first_error or text
            self.last_error = text
        elif level == "warning" and len(self.warnings) < KEEP_WARNINGS and any(word in text.lower() for word in RELEVANT_WARNING):
            self.warnings.append(text)

    def summary(self) -> str:
        """One line: "first error: ...; last error: ... (N errors); warnings: a | b", or ""."""
        parts = []
        if self.errors:
            parts.append(f"TensorRT error: {self.first_error}" if self.errors == 1 else
                         f"first TensorRT error: {self.first_error}; last: {self.last_error} ({self.errors} errors)")
        if self.warnings:
            parts.append("warnings: " + " | ".join(self.warnings[:3]))
        return "; ".join(parts)

    def says_driver_too_old(self) -> bool:
        return any("error: 35" in text or "insufficientdriver" in text.lower().replace(" ", "") for text in (self.first_error, self.last_error, *self.warnings))

    def logger(self, trt):
        """A tensorrt.ILogger that feeds this log (INTERNAL_ERROR and ERROR as errors)."""
        log = self
        severity = trt.ILogger.Severity

        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, level, msg):
                if int(level) <= int(severity.ERROR):
                    log.add("error", msg)
                elif int(level) == int(severity.WARNING):
                    log.add("warning", msg)

        return Logger()


def create(factory, what: str, log: TensorrtLog, fail) -> Any:
    """`factory()` (trt.Builder(logger), trt.Runtime(logger), trt.OnnxParser(...)), or `fail(message)`
    with why: when TensorRT cannot initialise CUDA (a driver older than its CUDA major, a process
    forked after CUDA started) the C++ factory returns nullptr, which pybind11 raises as
    `TypeError: ... factory function returned nullptr`, with the cause in the log if anywhere."""
    try:
        made = factory()
    except (TypeError, RuntimeError) as err:
        made, raised = None, " ".join(str(err).split())[:MESSAGE_CHARS]
    else:
        raised = "it returned None"
    if made is not None:
        return made
    message = f"TensorRT could not create its {what} ({raised})"
    said = log.summary()
    if said:
        message += f": {said}"
    if log.says_driver_too_old():
        message += f"; the NVIDIA driver is older than the CUDA major this TensorRT is built for: {INSTALL}"
    elif not said:
        message += "; TensorRT logged nothing: is the GPU usable from this process (see `nvidia-smi`)?"
    fail(message)
    raise AssertionError("fail() must raise")  # pragma: no cover
