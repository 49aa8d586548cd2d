"""NVIDIA GPUs, for TensorRT steps: is one usable here, what is it, and device memory for a runner.

Everything goes through cuda-python's runtime bindings (the `tensorrt` extra installs them), whose
calls return (error, value...) tuples. Nothing here imports a CUDA library at import time: planning a
CPU-only build never pays for it, and a machine without a GPU gets a reason, not a crash.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

INSTALL = "pip install 'kiln[tensorrt]'"


class CudaUnavailable(Exception):
    """This machine cannot run CUDA work; str() says what is missing (a package, a driver, a GPU)."""


def cudart():
    """cuda-python's runtime module (cuda.bindings.runtime since 12.6; cuda.cudart before)."""
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


@functools.cache
def device_facts(ordinal: int) -> dict[str, Any]:
    """What a TensorRT engine is specific to: GPU name, compute capability, driver and TensorRT
    versions. Cached per process (asked by every up-to-date check of a TensorRT step)."""
    if importlib.util.find_spec("tensorrt") is None:
        raise CudaUnavailable(f"the tensorrt package is not installed ({INSTALL})")
    rt = cudart()
    try:
        count = check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except CudaUnavailable as err:
        raise CudaUnavailable(f"no usable NVIDIA GPU ({err})") from None
    if ordinal >= count:
        raise CudaUnavailable(f"CUDA device {ordinal} was asked for but {count} device(s) found")
    props = check(rt.cudaGetDeviceProperties(ordinal), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    import tensorrt

    return {
        "gpu": name.rstrip("\x00").strip(),
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda_driver": check(rt.cudaDriverGetVersion(), "cudaDriverGetVersion"),
        "tensorrt": tensorrt.__version__,
    }


def unavailable_reason(ordinal: int) -> str | None:
    """None when device `ordinal` can build and run TensorRT engines here, else why not."""
    try:
        device_facts(ordinal)
    except CudaUnavailable as err:
        return str(err)
    return None


class DeviceBuffers:
    """Device memory for a runner's tensors, grown when a batch needs more; freed on close()."""

    def __init__(self, ordinal: int):
        self.rt = cudart()
        check(self.rt.cudaSetDevice(ordinal), "cudaSetDevice")
        self.stream = check(self.rt.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)

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
        for ptr, _ in self._buffers.values():
            self.rt.cudaFree(ptr)
        self._buffers.clear()
        self.rt.cudaStreamDestroy(self.stream)
