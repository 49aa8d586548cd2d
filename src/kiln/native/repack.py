"""Fast float casts, transpose and weight quantization on kiln._native.

Python allocates every output (np.empty: the native threads then touch the fresh pages first, in
parallel) and the C++ fills it. Results are byte-identical to the numpy twins in
kiln.native.twins, which define them (conventions documented there).

`simd=False` forces the portable scalar kernels (the results are the same; tests use it).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from kiln import _native
from kiln.native import twins

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def _contig(x) -> np.ndarray:
    """C-contiguous, copying only if needed (np.ascontiguousarray would turn 0-d into 1-d)."""
    x = np.asarray(x)
    return x if x.flags.c_contiguous else np.ascontiguousarray(x)


def _f32(x: np.ndarray, what: str = "x") -> np.ndarray:
    x = _contig(x)
    if x.dtype != np.float32:
        raise TypeError(f"{what} must be float32, got {x.dtype}")
    return x


def _output(out: np.ndarray | None, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A fresh np.empty output, or the caller's `out` after checking it fits."""
    if out is None:
        return np.empty(shape, dtype)
    if out.dtype != dtype or out.shape != shape:
        raise ValueError(f"out must be {np.dtype(dtype)} of shape {shape}, got {out.dtype} of shape {out.shape}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out must be C-contiguous and writeable")
    return out


# ---------------------------------------------------------------- casts
# `out`: an optional preallocated output to fill (saves the page faults of a fresh array).

def f32_to_f16(x: np.ndarray, *, out: np.ndarray | None = None, simd: bool = True) -> np.ndarray:
    """float32 -> float16, round to nearest even; NaN -> sign|0x7E00."""
    x = _f32(x)
    out = _output(out, x.shape, np.float16)
    _native.f32_to_f16(x, out.view(np.uint16), simd)
    return out


def f32_to_bf16(x: np.ndarray, *, out: np.ndarray | None = None, simd: bool = True) -> np.ndarray:
    """float32 -> ml_dtypes.bfloat16, round to nearest even; NaN -> sign|0x7FC0."""
    x = _f32(x)
    out = _output(out, x.shape, BFLOAT16)
    _native.f32_to_bf16(x, out.view(np.uint16), simd)
    return out


def to_f32(x: np.ndarray, *, out: np.ndarray | None = None, simd: bool = True) -> np.ndarray:
    """float16 or bfloat16 -> float32, exact."""
    x = _contig(x)
    out = _output(out, x.shape, np.float32)
    if x.dtype == np.float16:
        _native.f16_to_f32(x.view(np.uint16), out, simd)
    elif x.dtype == BFLOAT16:
        _native.bf16_to_f32(x.view(np.uint16), out, simd)
    else:
        raise TypeError(f"to_f32 takes float16 or bfloat16, got {x.dtype}")
    return out


# ---------------------------------------------------------------- transpose

_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def transpose2d(a: np.ndarray, *, simd: bool = True) -> np.ndarray:
    """np.ascontiguousarray(a.T) for a 2-D array of any dtype with 1, 2, 4 or 8-byte elements."""
    a = _contig(a)
    if a.ndim != 2:
        raise ValueError(f"transpose2d takes a 2-D array, got {a.ndim}-D")
    if a.dtype.itemsize not in _UINT_OF_SIZE or a.dtype.hasobject:
        raise TypeError(f"transpose2d takes 1, 2, 4 or 8-byte elements, got {a.dtype}")
    out = np.empty((a.shape[1], a.shape[0]), a.dtype)
    as_uint = _UINT_OF_SIZE[a.dtype.itemsize]  # the kernel moves bytes; any dtype of that size works
    _native.transpose2d(a.view(as_uint), out.view(as_uint), simd)
    return out


# ---------------------------------------------------------------- int8

def _axis_code(axis: int | None, ndim: int) -> int:
    if axis is None:
        return -1
    if ndim != 2 or axis not in (0, 1):
        raise ValueError(f"per-channel quantization takes a 2-D weight and axis 0 or 1, got axis={axis} for {ndim}-D")
    return axis


def _params_shape(axis: int | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    return () if axis is None else (shape[axis],)


def quantize_int8(w: np.ndarray, *, symmetric: bool = True, axis: int | None = None, dtype=None, simd: bool = True):
    """(q, scale, zero_point) for a float32 weight.

    axis None: per tensor (scale shape ()); axis 0: one scale per row of w[C, K] (the usual
    per-output-channel case); axis 1: one per column (computed by a column-wise scan, no transpose).
    symmetric: int8, zero point 0, scale = max|w| / 127, q in [-127, 127].
    asymmetric: uint8 (default) or int8, ONNX DynamicQuantizeLinear's scale and zero point.
    q = clamp(rint(w / scale) + zp), half to even. NaNs are left out of the range and quantize to
    the zero point; an all-zero range gives scale 1. Definition: kiln.native.twins.quantize_int8.
    """
    dtype = np.dtype(dtype or (np.int8 if symmetric else np.uint8))
    if dtype not in (np.int8, np.uint8):
        raise TypeError(f"quantize_int8 makes int8 or uint8, got {dtype}")
    if symmetric and dtype != np.int8:
        raise ValueError("symmetric quantization makes int8 (zero point 0)")
    w = _f32(w, "w")
    code = _axis_code(axis, w.ndim)
    x2 = w if code != -1 else w.reshape(1, -1)
    q = np.empty(w.shape, dtype)
    pshape = _params_shape(axis, w.shape)
    scale = np.empty(pshape, np.float32)
    zero_point = np.empty(pshape, dtype)
    _native.quantize_int8(x2, q.reshape(x2.shape), scale.reshape(-1), zero_point.reshape(-1), code, symmetric, simd)
    return q, scale, zero_point


def dequantize_int8(q: np.ndarray, scale, zero_point, *, axis: int | None = None, simd: bool = True) -> np.ndarray:
    """(q - zero_point) * scale in float32, params as quantize_int8 returned them."""
    q = _contig(q)
    code = _axis_code(axis, q.ndim)
    q2 = q if code != -1 else q.reshape(1, -1)
    scale = np.ascontiguousarray(scale, np.float32).reshape(-1)
    zero_point = np.ascontiguousarray(zero_point).reshape(-1)
    out = np.empty(q.shape, np.float32)
    _native.dequantize_int8(q2, scale, zero_point, code, out.reshape(q2.shape), simd)
    return out


# ---------------------------------------------------------------- int4 for MatMulNBits

def quantize_int4(w: np.ndarray, block_size: int = 32, *, symmetric: bool = False, simd: bool = True):
    """(B, scales, zero_points) for onnxruntime's com.microsoft MatMulNBits (bits=4) from float32 W[K, N].

    B uint8 [N, n_blocks, block_size // 2], scales float32 [N * n_blocks], zero_points uint8
    [N * ceil(n_blocks / 2)] or None when symmetric (MatMulNBits then uses 8). The node's attributes are
    K, N, bits=4, block_size. Same bytes as onnxruntime's own quantizer; definition in
    kiln.native.twins.quantize_int4_matmulnbits.
    """
    w = _f32(w, "w")
    if w.ndim != 2:
        raise ValueError(f"quantize_int4 takes a 2-D weight [K, N], got {w.ndim}-D")
    if block_size < 16 or block_size > 256 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [16, 256], got {block_size}")
    K, N = w.shape
    n_blocks = -(-K // block_size)
    B = np.empty((N, n_blocks, block_size // 2), np.uint8)
    scales = np.empty(N * n_blocks, np.float32)
    zero_points = np.empty(0 if symmetric else N * ((n_blocks + 1) // 2), np.uint8)
    _native.quantize_int4_matmulnbits(w, block_size, symmetric, B, scales, zero_points, simd)
    return B, scales, (None if symmetric else zero_points)


def dequantize_int4(B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int) -> np.ndarray:
    """W[K, N] float32 from MatMulNBits inputs: (q - zp) * scale, zp 8 when zero_points is None.
    numpy only (the twin itself): not a hot path."""
    return twins.dequantize_int4_matmulnbits(B, scales, zero_points, K)
