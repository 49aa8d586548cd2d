"""A fake of cuda-python's runtime bindings (cuda.bindings.runtime) for kiln's CPU-only TensorRT tests.

Why a fake: TensorRT's libraries are published only on NVIDIA's own package index and the machines
these tests run on have no NVIDIA GPU, so neither TensorRT nor a working CUDA can exist here. The
TensorRT tests therefore replace the binding boundary (this module and ../../tensorrt) and nothing
else; this is the only place in kiln's tests where that is done.

It keeps the real module's conventions: every call returns a tuple (error, values...), errors are
int subclasses with a .name (cuda-bindings' FastEnum), device pointers are ints (here: addresses of
host buffers, so cudaMemcpy really copies), streams are objects with __int__ and getPtr(). It
models what kiln depends on: CUDA initialises on the first call that needs a context, and a
process forked after that fails its CUDA calls with cudaErrorInitializationError (3), as the real
driver does. cudaDriverGetVersion and cudaRuntimeGetVersion initialise nothing, as in CUDA.

Configured by the environment variable KILN_FAKE_CUDA (JSON, read at each call, so a probe
subprocess sees the same): devices [[name, major, minor], ...], driver and runtime (CUDA's integer
versions, 13000 = 13.0; driver 0 is what CUDA reports where no driver is installed), count_error
(an error code every context call returns, e.g. 35), raises (a message every context call raises
as RuntimeError, as cuda-python 12 does when it cannot dlopen libcuda).
"""

import ctypes
import json
import os
from types import SimpleNamespace

ERROR_NAMES = {0: "cudaSuccess", 2: "cudaErrorMemoryAllocation", 3: "cudaErrorInitializationError",
               35: "cudaErrorInsufficientDriver", 100: "cudaErrorNoDevice", 101: "cudaErrorInvalidDevice"}


class cudaError_t(int):
    def __new__(cls, code: int):
        err = int.__new__(cls, code)
        err.name = ERROR_NAMES.get(code, f"cudaError{code}")
        return err


class cudaMemcpyKind:
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class cudaStream_t:
    def __init__(self, handle: int):
        self._handle = handle

    def __int__(self) -> int:
        state.int_calls += 1
        return self._handle

    def getPtr(self) -> int:
        return self._handle


class State:
    """What the fake driver holds; tests read it (reset() between tests)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.initialised_pid = None  # the process whose first context call initialised CUDA
        self.current_device = 0
        self.allocations = {}  # pointer -> (host buffer standing in for device memory, device)
        self.streams = set()
        self.calls = []
        self.int_calls = 0
        self.native_handle_calls = 0


state = State()


def _config() -> dict:
    return json.loads(os.environ.get("KILN_FAKE_CUDA") or "{}")


def _devices() -> list:
    return _config().get("devices", [["NVIDIA H200", 9, 0]])


def _context() -> cudaError_t:
    """A call that needs a context: initialises CUDA in this process, or fails as a forked child's does."""
    if _config().get("raises"):
        raise RuntimeError(_config()["raises"])
    code = _config().get("count_error", 0)
    if code:
        return cudaError_t(code)
    if state.initialised_pid is None:
        state.initialised_pid = os.getpid()
    elif state.initialised_pid != os.getpid():
        return cudaError_t(3)
    return cudaError_t(0)


def cudaDriverGetVersion():
    state.calls.append("cudaDriverGetVersion")
    return cudaError_t(0), _config().get("driver", 13000)


def cudaRuntimeGetVersion():
    state.calls.append("cudaRuntimeGetVersion")
    return cudaError_t(0), _config().get("runtime", 13000)


def cudaGetDeviceCount():
    state.calls.append("cudaGetDeviceCount")
    err = _context()
    return (err, 0) if err else (err, len(_devices()))


def cudaGetDeviceProperties(ordinal: int):
    state.calls.append("cudaGetDeviceProperties")
    err = _context()
    if err:
        return err, None
    if ordinal >= len(_devices()):
        return cudaError_t(101), None
    name, major, minor = _devices()[ordinal]
    return err, SimpleNamespace(name=name.encode() + b"\x00" * (256 - len(name)), major=major, minor=minor)


def cudaSetDevice(ordinal: int):
    state.calls.append(f"cudaSetDevice({ordinal})")
    err = _context()
    if err:
        return (err,)
    if ordinal >= len(_devices()):
        return (cudaError_t(101),)
    state.current_device = ordinal
    return (err,)


def cudaStreamCreate():
    err = _context()
    if err:
        return err, None
    stream = cudaStream_t(1000 + len(state.streams) + len(state.calls))
    state.streams.add(stream.getPtr())
    return err, stream


def cudaStreamDestroy(stream):
    state.streams.discard(stream.getPtr())
    return (cudaError_t(0),)


def cudaStreamSynchronize(stream):
    return (cudaError_t(0),)


def cudaMalloc(nbytes: int):
    err = _context()
    if err:
        return err, 0
    buffer = ctypes.create_string_buffer(nbytes)
    pointer = ctypes.addressof(buffer)
    state.allocations[pointer] = (buffer, state.current_device)
    return err, pointer


def cudaFree(pointer: int):
    state.allocations.pop(pointer, None)
    return (cudaError_t(0),)


def cudaMemcpy(dst: int, src: int, nbytes: int, kind: int):
    device = dst if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else src
    if device not in state.allocations:
        return (cudaError_t(1),)
    ctypes.memmove(dst, src, nbytes)
    return (cudaError_t(0),)
