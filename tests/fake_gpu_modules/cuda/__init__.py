"""Fake `cuda` namespace (cuda-python) for kiln's CPU-only TensorRT tests; see cuda/bindings/runtime.py."""
