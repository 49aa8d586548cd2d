"""Fake cuda.bindings (cuda-python 13) for kiln's CPU-only TensorRT tests; see runtime.py."""

__version__ = "13.0.1"
