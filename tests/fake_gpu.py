"""A fake NVIDIA GPU for the TensorRT tests: fake `tensorrt` and cuda-python modules
(tests/fake_gpu_modules) put on the import path of this process and of the probe subprocess.

Fakes at the binding boundary are used here, and only for TensorRT, because the real library cannot
be installed on any machine these tests run on (its wheels come only from NVIDIA's index) and no
machine has a GPU. What the fakes model is stated in their docstrings; nothing here has run on a GPU.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

MODULES = Path(__file__).resolve().parent / "fake_gpu_modules"
FAKED = ("tensorrt", "cuda")  # top-level names whose modules the fakes replace


@dataclass
class FakeGpu:
    trt: ModuleType  # the fake tensorrt; .FAKE steers it
    cuda: ModuleType  # the fake cuda.bindings.runtime; .state is what the fake driver holds


def _forget_modules() -> None:
    for name in [m for m in sys.modules if m.split(".")[0] in FAKED]:
        del sys.modules[name]


def _clear_caches() -> None:
    from kiln.base import cuda
    from kiln.base.tools import tool_version

    cuda.probe_outcome.cache_clear()
    cuda.device_facts.cache_clear()
    tool_version.cache_clear()


def configure(monkeypatch, **config: Any) -> None:
    """Set what the fake driver reports (devices, driver, runtime, count_error), here and in the probe."""
    monkeypatch.setenv("KILN_FAKE_CUDA", json.dumps(config))
    _clear_caches()


def installed(monkeypatch, **config: Any) -> Iterator[FakeGpu]:
    """For a fixture: `yield from installed(monkeypatch)`. The fakes importable here and in
    subprocesses, kiln's per-process caches cleared before and after."""
    _forget_modules()
    monkeypatch.syspath_prepend(str(MODULES))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(MODULES), *filter(None, [os.environ.get("PYTHONPATH")])]))
    configure(monkeypatch, **config)
    import tensorrt
    from cuda.bindings import runtime

    tensorrt.FAKE.reset()
    runtime.state.reset()
    try:
        yield FakeGpu(tensorrt, runtime)
    finally:
        _forget_modules()
        _clear_caches()
