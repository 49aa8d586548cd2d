"""numpy twins of every native kernel (csrc/kernels/compare.*, repack.*, quant.*, calib.*).

Readable and slow, and the DEFINITION of each result: tests/native compares kiln._native with these
byte for byte. All arithmetic is float32 in the order the C++ does it (no fused multiply-add).

Conventions
- diff_stats: max |out-ref|, max |out-ref| / max(|ref|, eps) and the count of non-finite out, in float32.
- fp32 -> fp16: IEEE round to nearest even (numpy's astype is exact), overflow -> +-Inf, -0.0 kept;
  every NaN becomes sign | 0x7E00.
- fp32 -> bf16: (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16; every NaN becomes sign | 0x7FC0.
- fp16 -> fp32: exact; a NaN keeps sign and payload and comes out quiet: sign | 0x7FC00000 | (m << 13)
  (what the F16C instruction does). bf16 -> fp32: bits << 16.
- int8 (ONNX QuantizeLinear / DynamicQuantizeLinear arithmetic): see quantize_int8.
- int4 for onnxruntime's MatMulNBits, bit-compatible with onnxruntime's own quantizer: see
  quantize_int4_matmulnbits.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

F32 = np.float32
F16_QNAN = 0x7E00
BF16_QNAN = 0x7FC0


def _sign16(x: np.ndarray) -> np.ndarray:
    return ((x.view(np.uint32) >> 16) & 0x8000).astype(np.uint16)


def f32_to_f16(x: np.ndarray) -> np.ndarray:
    x = np.require(x, F32, "C")
    with np.errstate(over="ignore", invalid="ignore"):
        h = x.astype(np.float16).view(np.uint16)
    return np.where(np.isnan(x), _sign16(x) | F16_QNAN, h).astype(np.uint16).view(np.float16)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    x = np.require(x, F32, "C")
    b = x.view(np.uint32)
    rounded = ((b + np.uint32(0x7FFF) + ((b >> 16) & 1)) >> 16).astype(np.uint16)  # only NaNs can wrap
    return np.where(np.isnan(x), _sign16(x) | BF16_QNAN, rounded).astype(np.uint16).view(ml_dtypes.bfloat16)


def f16_to_f32(h: np.ndarray) -> np.ndarray:
    h = np.require(h, requirements="C").view(np.uint16)
    f = h.view(np.float16).astype(F32)
    sign = (h.astype(np.uint32) & 0x8000) << 16
    quiet_nan = (sign | 0x7FC00000 | ((h.astype(np.uint32) & 0x3FF) << 13)).view(F32)
    return np.where(np.isnan(f), quiet_nan, f)


def bf16_to_f32(b: np.ndarray) -> np.ndarray:
    return (np.require(b, requirements="C").view(np.uint16).astype(np.uint32) << 16).view(F32)


def transpose2d(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a).T)


# ---------------------------------------------------------------- int8

def int8_limits(symmetric: bool, dtype) -> tuple[int, int]:
    """(qmin, qmax): symmetric int8 uses [-127, 127] so that the range is symmetric around 0."""
    dtype = np.dtype(dtype)
    if symmetric:
        if dtype != np.int8:
            raise ValueError("symmetric int8 quantization needs dtype int8")
        return -127, 127
    return (-128, 127) if dtype == np.int8 else (0, 255)


def _range(x: np.ndarray, axis) -> tuple[np.ndarray, np.ndarray]:
    """min and max with NaNs ignored; +Inf / -Inf where there is no other value."""
    nan = np.isnan(x)
    return (np.where(nan, np.inf, x).min(axis=axis, initial=np.inf).astype(F32),
            np.where(nan, -np.inf, x).max(axis=axis, initial=-np.inf).astype(F32))


def int8_params(mn, mx, symmetric: bool, qmin: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point as int32) from a range that is first widened to hold 0.

    symmetric:  scale = max(-mn, mx) / qmax, zp = 0
    asymmetric: scale = (mx - mn) / (qmax - qmin), zp = clamp(rint(qmin - mn / scale), qmin, qmax)
    A zero scale becomes 1 (q = zp, dequantizes to exact zeros); a NaN zero point becomes qmin.
    """
    mn = np.where(np.asarray(mn, F32) < 0, mn, F32(0)).astype(F32)
    mx = np.where(np.asarray(mx, F32) > 0, mx, F32(0)).astype(F32)
    with np.errstate(all="ignore"):
        if symmetric:
            scale = np.where(-mn > mx, -mn, mx) / F32(qmax)
        else:
            scale = (mx - mn) / F32(qmax - qmin)
        scale = np.where(scale == 0, F32(1), scale).astype(F32)
        if symmetric:
            return scale, np.zeros(scale.shape, np.int32)
        zf = np.rint(F32(qmin) - mn / scale)
    zp = np.where(zf > qmin, np.where(zf < qmax, zf, qmax), qmin)  # NaN fails both tests -> qmin
    return scale, zp.astype(np.int32)


def quantize_int8(w: np.ndarray, *, symmetric: bool = True, axis: int | None = None, dtype=None):
    """(q, scale, zero_point) for float32 w.

    axis None: one scale for the whole tensor (shape ()); axis 0: one per row of a 2-D w;
    axis 1: one per column. q = clamp(rint(w / scale) + zp, qmin, qmax), rint = half to even,
    and a NaN w / scale counts as 0 (so NaN weights quantize to the zero point). NaNs are
    ignored when taking the range. zero_point has q's dtype (int8 default, uint8 default when
    asymmetric).
    """
    dtype = np.dtype(dtype or (np.int8 if symmetric else np.uint8))
    qmin, qmax = int8_limits(symmetric, dtype)
    w = np.asarray(w, F32)
    if axis is None:
        mn, mx = _range(w, None)
    else:
        mn, mx = _range(w, 1 - axis)  # reduce over the other axis of a 2-D w
    scale, zp = int8_params(mn, mx, symmetric, qmin, qmax)
    q = np.asarray(_quantize(w, scale, zp, axis, qmin, qmax)).astype(dtype)
    return q, scale, zp.astype(dtype)


def _expand(p: np.ndarray, axis) -> np.ndarray:
    return p if axis is None else (p[:, None] if axis == 0 else p[None, :])


def _quantize(w, scale, zp, axis, qmin, qmax) -> np.ndarray:
    with np.errstate(all="ignore"):
        y = w / _expand(scale, axis)
    y = np.where(np.isnan(y), F32(0), y)
    r = np.rint(y) + _expand(zp, axis).astype(F32)
    return np.clip(r, F32(qmin), F32(qmax)).astype(np.int32)


def dequantize_int8(q: np.ndarray, scale, zero_point, *, axis: int | None = None) -> np.ndarray:
    """(q - zero_point) * scale in float32."""
    scale = np.asarray(scale, F32)
    zp = np.asarray(zero_point).astype(np.int32)
    diff = (np.asarray(q).astype(np.int32) - _expand(zp, axis)).astype(F32)
    return np.asarray(diff * _expand(scale, axis))


# ---------------------------------------------------------------- int4 (MatMulNBits)

def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C roundf for x >= 0, exactly (x - trunc(x) is exact; floor(x + 0.5) is not)."""
    t = np.trunc(x)
    return np.where(x - t >= F32(0.5), t + F32(1), t).astype(F32)


def int4_blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """float32 w[K, N] -> [N, n_blocks, block_size] blocks along K, the last one zero-padded."""
    K, N = w.shape
    n_blocks = -(-K // block_size)
    padded = np.zeros((n_blocks * block_size, N), F32)
    padded[:K] = w
    return np.ascontiguousarray(padded.T).reshape(N, n_blocks, block_size)


def quantize_int4_matmulnbits(w: np.ndarray, block_size: int = 32, *, symmetric: bool = False):
    """(B, scales, zero_points) for onnxruntime's com.microsoft MatMulNBits (bits=4) from float32 W[K, N].

    Per column n and block of block_size rows of K (the last block zero-padded), as onnxruntime's
    MLAS quantizer computes it, so the bytes equal onnxruntime.capi._pybind_state.quantize_matmul_4bits:
      mn = min(min(block), 0), mx = max(max(block), 0), NaNs ignored
      asymmetric: scale = (mx - mn) / 15, zpf = 0 - mn / scale (mn if scale == 0),
                  zp = 0 if not zpf > 0 else 15 if zpf >= 15 else round(zpf)
      symmetric:  m = mx if |mx| > |mn| else mn, scale = -m / 8, zero point 8 (not stored)
      r = 1 / scale (0 if scale == 0), q = round(clamp(x * r + zp, 0, 15)), NaN -> 0
    round is half away from zero (C roundf). x * r + zp is two float32 roundings, no FMA.
    Layout: B uint8 [N, n_blocks, block_size // 2], the lower k in the low nibble, padding nibbles
    (k >= K) 0; scales float32 [N * n_blocks]; zero_points uint8 [N * ceil(n_blocks / 2)], per column,
    block 2j in the low nibble and 2j+1 in the high one, an odd count padded with 8; None if symmetric.
    """
    w = np.asarray(w, F32)
    K, N = w.shape
    if block_size < 16 or block_size > 256 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two in [16, 256], got {block_size}")
    blocks = int4_blocks(w, block_size)
    n_blocks = blocks.shape[1]
    mn, mx = _range(blocks, -1)
    mn = np.where(mn < 0, mn, F32(0)).astype(F32)
    mx = np.where(mx > 0, mx, F32(0)).astype(F32)
    with np.errstate(all="ignore"):
        if symmetric:
            scale = (-np.where(np.abs(mx) > np.abs(mn), mx, mn) / F32(8)).astype(F32)
            zp = np.full(scale.shape, 8, np.int32)
        else:
            scale = ((mx - mn) / F32(15)).astype(F32)
            zpf = np.where(scale != 0, F32(0) - mn / scale, mn).astype(F32)
            zp = np.where(zpf > 0, np.where(zpf < 15, _round_half_away(zpf), F32(15)), F32(0)).astype(np.int32)
        recip = np.where(scale != 0, F32(1) / scale, F32(0)).astype(F32)
        y = blocks * recip[..., None] + zp[..., None].astype(F32)
    y = np.minimum(np.where(y > 0, y, F32(0)), F32(15))  # NaN fails y > 0 -> 0
    q = _round_half_away(y).astype(np.uint8).reshape(N, n_blocks * block_size)
    q[:, K:] = 0  # padding nibbles
    q = q.reshape(N, n_blocks, block_size)
    B = q[..., 0::2] | (q[..., 1::2] << 4)
    if symmetric:
        return B, scale.reshape(-1), None
    zp_padded = np.full((N, n_blocks + n_blocks % 2), 8, np.uint8)
    zp_padded[:, :n_blocks] = zp
    zero_points = zp_padded[:, 0::2] | (zp_padded[:, 1::2] << 4)
    return B, scale.reshape(-1), zero_points.reshape(-1)


def dequantize_int4_matmulnbits(B: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, K: int) -> np.ndarray:
    """W[K, N] float32 = (q - zp) * scale, zp 8 when zero_points is None (what MatMulNBits computes)."""
    N, n_blocks, blob = B.shape
    block_size = blob * 2
    q = np.stack([B & 0x0F, B >> 4], axis=-1).reshape(N, n_blocks, block_size).astype(np.int32)
    if zero_points is None:
        zp = np.full((N, n_blocks), 8, np.int32)
    else:
        zp_bytes = np.asarray(zero_points, np.uint8).reshape(N, -1)
        zp = np.stack([zp_bytes & 0x0F, zp_bytes >> 4], axis=-1).reshape(N, -1)[:, :n_blocks].astype(np.int32)
    scale = np.asarray(scales, F32).reshape(N, n_blocks)
    w = (q - zp[..., None]).astype(F32) * scale[..., None]
    return np.ascontiguousarray(w.reshape(N, n_blocks * block_size)[:, :K].T)


# ---------------------------------------------------------------- calibration (csrc/kernels/calib.*)

def minmax_update(x: np.ndarray, lo=np.inf, hi=-np.inf, nan_count: int = 0) -> tuple[np.float32, np.float32, int]:
    """(lo, hi, nan_count) after a pass over float32 x: NaNs skipped and counted; lo / hi replaced only
    by strictly smaller / larger values, so among equal values (+0, -0) the first in index order wins."""
    x = np.asarray(x, F32).reshape(-1)
    nan = np.isnan(x)
    v = x[~nan]
    lo, hi = F32(lo), F32(hi)
    if v.size:
        mn, mx = v.min(), v.max()
        if mn < lo:
            lo = v[np.argmax(v == mn)]  # the first occurrence carries the sign of a zero
        if mx > hi:
            hi = v[np.argmax(v == mx)]
    return F32(lo), F32(hi), int(nan_count) + int(nan.sum())


def abs_histogram_index(x: np.ndarray, range_, nbins: int) -> np.ndarray:
    """Bin of each non-NaN |x| (NaNs dropped): t = (|x| / range) * nbins in float32, t >= nbins -> nbins - 1."""
    x = np.asarray(x, F32).reshape(-1)
    x = x[~np.isnan(x)]
    with np.errstate(over="ignore"):
        t = (np.abs(x) / F32(range_)) * F32(nbins)  # float32 arrays: the same two roundings as the C++
    idx = np.zeros(t.shape, np.int64)
    inside = t < F32(nbins)
    idx[inside] = t[inside].astype(np.int64)  # truncation = floor for t >= 0
    idx[~inside] = nbins - 1
    return idx


def abs_histogram_accumulate(x: np.ndarray, range_, bins: np.ndarray) -> np.ndarray:
    """bins (uint64) + the histogram of |x| over [0, range]; see abs_histogram_index."""
    bins = np.asarray(bins, np.uint64)
    add = np.bincount(abs_histogram_index(x, range_, bins.size), minlength=bins.size).astype(np.uint64)
    return bins + add


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """TensorRT / MXNet smoothing of unnormalized counts: zeros get eps, taken evenly off the rest."""
    zeros = p == 0
    n_nonzero = p.size - int(zeros.sum())
    if n_nonzero == 0:
        return None
    out = p + np.where(zeros, eps, -eps * zeros.sum() / n_nonzero)
    return out if np.all(out > 0) else None


def entropy_kl(bins: np.ndarray, i: int, m: int) -> float:
    """KL(P || Q) of clipping the |x| histogram at bin i with m levels (see
    kiln.native.calibration.entropy_threshold); inf when a smoothed distribution is not positive."""
    h = np.asarray(bins, np.uint64).astype(np.float64)
    sliced = h[:i]
    p = sliced.copy()
    p[-1] += h[i:].sum()
    nonzero = p != 0
    groups = np.repeat(np.arange(m), i // m)
    groups = np.concatenate([groups, np.full(i - groups.size, m - 1)])  # remainder -> last level
    level = np.bincount(groups, weights=sliced, minlength=m)
    norm = np.bincount(groups, weights=nonzero, minlength=m)
    q = np.where(nonzero, level[groups] / np.maximum(norm[groups], 1), 0.0)
    p, q = _smooth(p), _smooth(q)
    if p is None or q is None:
        return float("inf")
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def diff_stats(ref: np.ndarray, out: np.ndarray, eps: float = 1e-6) -> tuple[float, float, int]:
    """(max |out-ref|, max |out-ref| / max(|ref|, eps), count of non-finite out), all in float32."""
    ref = np.asarray(ref, dtype=np.float32).ravel()
    out = np.asarray(out, dtype=np.float32).ravel()
    if ref.size == 0:
        return 0.0, 0.0, 0
    diff = np.abs(out - ref)
    rel = diff / np.maximum(np.abs(ref), np.float32(eps))
    return float(diff.max()), float(rel.max()), int((~np.isfinite(out)).sum())
