"""Repack and quantization: kiln.native.repack vs numpy / ml_dtypes / the numpy twins / onnxruntime.

    python benchmarks/bench_repack.py [--mib 1024] [--repeat 3]

One run on a float32 [rows, 16384] matrix of --mib MiB (1 GiB: [16384, 16384]), warm caches (the
input is written before timing), best of --repeat. Both sides allocate their outputs inside the timed
call (kiln's np.empty output is faulted in by its worker threads), except the "preallocated" row. Prints GB/s of input bytes, kiln's
ratio to the reference measured in the same run, and whether both gave the same bytes. np.copyto into
a preallocated array is the memory ceiling.
"""

from __future__ import annotations

import argparse
import os
import time

import ml_dtypes
import numpy as np

from kiln import _native
from kiln.native import repack
from kiln.native import twins as ref


def best(fn, repeat: int):
    """(best seconds, result of the last call)."""
    times, result = [], None
    for _ in range(repeat):
        result = None  # free the previous output first: each run allocates afresh
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def same_bytes(a, b) -> bool:
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return len(a) == len(b) and all(
        (x is None and y is None) or np.asarray(x).reshape(-1).view(np.uint8).tobytes() == np.asarray(y).reshape(-1).view(np.uint8).tobytes()
        for x, y in zip(a, b))


def ort_int4(w: np.ndarray, block_size: int):
    """onnxruntime's own MatMulNBits quantizer (C++, its own thread pool), outputs flattened like ours."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    K, N = w.shape
    n_blocks = -(-K // block_size)
    B = np.zeros((N, n_blocks, block_size // 2), np.uint8)
    scales = np.zeros((N, n_blocks), np.float32)
    zero_points = np.zeros((N, (n_blocks + 1) // 2), np.uint8)
    quantize_matmul_4bits(B, w, scales, zero_points, block_size, N, K, False)
    return B, scales.reshape(-1), zero_points.reshape(-1)


def copy_seconds(x, repeat: int) -> float:
    """A plain memory copy of x, the bandwidth every kernel's GB/s is read against."""
    into = np.empty_like(x)
    np.copyto(into, x)
    seconds, _ = best(lambda: np.copyto(into, x), repeat)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    cols = 16384
    rows = max(16, (args.mib << 20) // (4 * cols))
    x = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
    gbs = lambda seconds: x.nbytes / seconds / 1e9  # noqa: E731

    out16, ref16 = np.zeros(x.shape, np.float16), np.zeros(x.shape, np.float16)  # preallocated, faulted in
    cases = [
        ("fp32->fp16", lambda: repack.f32_to_f16(x), "numpy astype(float16)", lambda: x.astype(np.float16)),
        ("fp32->fp16 into preallocated out=", lambda: repack.f32_to_f16(x, out=out16),
         "np.copyto(out, x, casting=same_kind)", lambda: (np.copyto(ref16, x, casting="same_kind"), ref16)[1]),
        ("fp32->bf16", lambda: repack.f32_to_bf16(x), "ml_dtypes astype(bfloat16)", lambda: x.astype(ml_dtypes.bfloat16)),
        ("int8 per-channel symmetric (axis 0)", lambda: repack.quantize_int8(x, axis=0),
         "numpy twin", lambda: ref.quantize_int8(x, axis=0)),
        ("int4 MatMulNBits block 32 asym", lambda: repack.quantize_int4(x, 32),
         "numpy twin", lambda: ref.quantize_int4_matmulnbits(x, 32)),
        ("int4 MatMulNBits block 32 asym", lambda: repack.quantize_int4(x, 32),
         "onnxruntime quantize_matmul_4bits", lambda: ort_int4(x, 32)),
        ("transpose", lambda: repack.transpose2d(x), "np.ascontiguousarray(a.T)", lambda: np.ascontiguousarray(x.T)),
    ]

    t_copy = copy_seconds(x, args.repeat)

    simd = "AVX2+F16C" if _native.simd_supported() else "scalar"
    print(f"\nkiln repack, float32 [{rows}, {cols}] = {x.nbytes >> 20} MiB, best of {args.repeat}, "
          f"{os.cpu_count()} CPUs, kernels: {simd}")
    print(f"{'operation':38s} {'kiln GB/s':>9s}  {'reference':36s} {'ref GB/s':>8s} {'ratio':>8s}  same bytes")
    print(f"{'memcpy (np.copyto, preallocated)':38s} {gbs(t_copy):9.2f}  {'(ceiling)':36s}")
    for name, kiln_fn, ref_name, ref_fn in cases:
        t_kiln, out_kiln = best(kiln_fn, args.repeat)
        t_ref, out_ref = best(ref_fn, args.repeat)
        same = "yes" if same_bytes(out_kiln, out_ref) else "NO"
        del out_kiln, out_ref
        print(f"{name:38s} {gbs(t_kiln):9.2f}  {ref_name:36s} {gbs(t_ref):8.2f} {t_ref / t_kiln:7.1f}x  {same}")


if __name__ == "__main__":
    main()
