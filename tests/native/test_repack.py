"""kiln.native.repack casts and transpose against their numpy twins (kiln.native.twins), bit for bit,
on both the SIMD and the portable scalar kernel paths."""

from __future__ import annotations


import ml_dtypes
import numpy as np
import pytest
from conftest import run_in_threads

from kiln import _native
from kiln.native import repack
from kiln.native import twins as ref

PATHS = [pytest.param(True, id="simd"), pytest.param(False, id="scalar")]
SIZES = [0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 1000, 10_007]


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def f32_bits(*bits: int) -> np.ndarray:
    return np.array(bits, np.uint32).view(np.float32)


def random_f32(seed: int, n: int) -> np.ndarray:
    """Magnitudes from float32 subnormals to 1e38, both signs, 2% NaN."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-44, 38, n)).astype(np.float32)
    x[rng.integers(0, max(n, 1), n // 50)] = np.nan
    return x


def half_ties() -> np.ndarray:
    """Every float32 within one ulp of each fp16 rounding midpoint (normal halves), and the midpoints."""
    normal = np.arange(0x0400, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
    mid = normal + (1 << 12)  # halfway to the next half: 13 dropped bits, the top one set
    bits = np.concatenate([mid - 1, mid, mid + 1, normal])
    return np.concatenate([bits, bits | 0x80000000]).astype(np.uint32).view(np.float32)


EDGES = np.concatenate([
    np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0, 65504.0, -65504.0, 65519.996, 65520.0,
              -65520.0, 1e5, 3.4028235e38, -3.4028235e38, 6.1035156e-05, 5.9604645e-08, 2.9802322e-08,
              8.940697e-08, 1e-45, -1e-45, 1.1754944e-38], np.float32),
    # NaN payloads (quiet and signalling, both signs) must all become the canonical NaN
    f32_bits(0x7F800001, 0xFF800001, 0x7FC00001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA00000),
    # fp16 subnormals: 2^-25 (tie) -> 0, 1.5*2^-25 -> 2^-24, 3*2^-25 (tie, odd) -> 2^-23, 1.25*2^-24;
    # the largest subnormal half, the tie above it (rounds up to the smallest normal) and beyond
    f32_bits(0x33000000, 0x33400000, 0x33C00000, 0x33A00000, 0x387FC000, 0x387FE000, 0x387FF000),
    # bf16 ties: low 16 bits 0x8000, even and odd kept bit; the tie just below Inf
    f32_bits(0x3F808000, 0x3F818000, 0x3F807FFF, 0x7F7F8000, 0x7F7FFFFF, 0x00008000, 0x00018000),
]).astype(np.float32)


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("seed", range(3))
def test_f32_to_f16_and_bf16_random(simd, n, seed):
    x = random_f32(seed, n)
    assert same(repack.f32_to_f16(x, simd=simd), ref.f32_to_f16(x))
    assert same(repack.f32_to_bf16(x, simd=simd), ref.f32_to_bf16(x))


@pytest.mark.parametrize("simd", PATHS)
def test_f32_to_f16_edges_and_every_rounding_midpoint(simd):
    x = np.concatenate([EDGES, half_ties()])
    got = repack.f32_to_f16(x, simd=simd)
    assert same(got, ref.f32_to_f16(x))
    bits = got.view(np.uint16)
    nan = np.isnan(x)
    assert np.all(bits[nan] == ((x[nan].view(np.uint32) >> 16) & 0x8000) | 0x7E00)
    assert got[x == np.float32(65520.0)][0] == np.inf and bits[:2].tolist() == [0x0000, 0x8000]


@pytest.mark.parametrize("simd", PATHS)
def test_f32_to_f16_strided_sweep_of_all_bit_patterns(simd):
    # every 4099th float32 bit pattern: all exponents, both signs, NaNs and subnormals
    x = np.arange(0, 1 << 32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32)
    assert same(repack.f32_to_f16(x, simd=simd), ref.f32_to_f16(x))
    assert same(repack.f32_to_bf16(x, simd=simd), ref.f32_to_bf16(x))


def test_twins_agree_with_numpy_and_ml_dtypes_off_nan():
    x = np.concatenate([EDGES, half_ties(), random_f32(9, 100_000)])
    x = x[~np.isnan(x)]
    with np.errstate(over="ignore"):
        assert same(ref.f32_to_f16(x), x.astype(np.float16))
    assert same(ref.f32_to_bf16(x), x.astype(ml_dtypes.bfloat16))
    assert same(repack.f32_to_bf16(x), x.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("simd", PATHS)
def test_f32_to_bf16_edges(simd):
    got = repack.f32_to_bf16(EDGES, simd=simd)
    assert same(got, ref.f32_to_bf16(EDGES))
    bits = got.view(np.uint16)
    nan = np.isnan(EDGES)
    assert np.all(bits[nan] == ((EDGES[nan].view(np.uint32) >> 16) & 0x8000) | 0x7FC0)
    assert np.isinf(got[EDGES.view(np.uint32) == 0x7F7FFFFF].astype(np.float32)).all()  # rounds up to Inf


@pytest.mark.parametrize("simd", PATHS)
def test_all_65536_halves_and_bfloat16s_to_f32(simd):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    h = bits.view(np.float16)
    assert same(repack.to_f32(h, simd=simd), ref.f16_to_f32(h))
    b = bits.view(ml_dtypes.bfloat16)
    assert same(repack.to_f32(b, simd=simd), ref.bf16_to_f32(b))
    finite = np.isfinite(h)
    assert same(ref.f16_to_f32(h)[finite], h[finite].astype(np.float32))
    ok = ~np.isnan(b.astype(np.float32))
    assert same(ref.bf16_to_f32(b)[ok], b[ok].astype(np.float32))


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("n", SIZES)
def test_round_trips(simd, n):
    x = random_f32(n, n)
    x = x[np.isfinite(x)]
    h = repack.f32_to_f16(x, simd=simd)
    assert same(repack.f32_to_f16(repack.to_f32(h, simd=simd), simd=simd), h)
    b = repack.f32_to_bf16(x, simd=simd)
    assert same(repack.f32_to_bf16(repack.to_f32(b, simd=simd), simd=simd), b)


def test_shapes_are_kept_and_input_layout_is_handled():
    x = random_f32(3, 6 * 35).reshape(6, 35)
    assert repack.f32_to_f16(x).shape == (6, 35)
    assert same(repack.f32_to_f16(x[:, ::2]), ref.f32_to_f16(np.ascontiguousarray(x[:, ::2])))
    with pytest.raises(TypeError, match="float32"):
        repack.f32_to_f16(x.astype(np.float64))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        repack.to_f32(x)


def test_read_only_inputs_are_accepted():
    x = random_f32(2, 4096).reshape(64, 64)
    x.flags.writeable = False
    h = repack.f32_to_f16(x)
    h.flags.writeable = False
    assert same(repack.to_f32(h), ref.f16_to_f32(h)) and same(repack.f32_to_bf16(x), ref.f32_to_bf16(x))
    assert same(repack.transpose2d(x), ref.transpose2d(x)) and same(repack.transpose2d(h), ref.transpose2d(h))


def test_0d_arrays_keep_their_shape():
    x = np.array(-np.nan, np.float32)
    assert same(repack.f32_to_f16(x), ref.f32_to_f16(x)) and repack.f32_to_f16(x).shape == ()
    assert same(repack.f32_to_bf16(x), ref.f32_to_bf16(x))
    assert same(repack.to_f32(np.float16(2.5)), np.array(2.5, np.float32))


def test_out_is_filled_and_checked():
    x = random_f32(4, 1000).reshape(10, 100)
    out = np.full((10, 100), 7, np.float16)
    assert repack.f32_to_f16(x, out=out) is out and same(out, ref.f32_to_f16(x))
    bout = np.empty((10, 100), ml_dtypes.bfloat16)
    assert repack.f32_to_bf16(x, out=bout) is bout and same(bout, ref.f32_to_bf16(x))
    fout = np.empty((10, 100), np.float32)
    assert repack.to_f32(out, out=fout) is fout and same(fout, ref.f16_to_f32(out))
    with pytest.raises(ValueError, match="out must be float16 of shape"):
        repack.f32_to_f16(x, out=np.empty((100, 10), np.float16))
    with pytest.raises(ValueError, match="out must be float16 of shape"):
        repack.f32_to_f16(x, out=np.empty((10, 100), np.uint16))
    with pytest.raises(ValueError, match="C-contiguous"):
        repack.f32_to_f16(x, out=np.empty((100, 10), np.float16).T)


@pytest.mark.parametrize("dtype", [np.uint8, np.bool_, np.int8, np.float16, ml_dtypes.bfloat16, np.int32, np.float32,
                                   np.float64, np.int64, np.complex64])
@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (17, 1), (33, 65), (100, 7), (64, 64), (130, 257), (0, 5), (16, 48)])
@pytest.mark.parametrize("simd", PATHS)
def test_transpose_matches_numpy(simd, dtype, shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.integers(0, 256, size=(*shape, np.dtype(dtype).itemsize), dtype=np.uint8).view(dtype).reshape(shape)
    got = repack.transpose2d(a, simd=simd)
    assert got.dtype == np.dtype(dtype) and same(got.view(np.uint8), ref.transpose2d(a).view(np.uint8))


@pytest.mark.parametrize("simd", PATHS)
def test_large_transpose_uses_threads_and_matches(simd):
    a = np.arange(1500 * 1001, dtype=np.float32).reshape(1500, 1001)
    assert same(repack.transpose2d(a, simd=simd), np.ascontiguousarray(a.T))
    b = a.view(np.uint16).reshape(1500, 2002)
    assert same(repack.transpose2d(b, simd=simd), np.ascontiguousarray(b.T))


def offset_view(n: int, dtype, offset: int) -> np.ndarray:
    """A writable C-contiguous array of n elements starting `offset` bytes past a 64-byte boundary."""
    raw = np.empty(n * np.dtype(dtype).itemsize + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    return raw[start:start + n * np.dtype(dtype).itemsize].view(dtype)


@pytest.mark.parametrize("offset", [0, 2, 16, 30, 48])
def test_large_outputs_at_any_alignment(offset):
    """Outputs of >= 1 MiB per thread take the streaming-store path, which peels to alignment first."""
    x = random_f32(5, (1 << 20) + 13)
    for native, twin in ((_native.f32_to_f16, ref.f32_to_f16), (_native.f32_to_bf16, ref.f32_to_bf16)):
        out = offset_view(x.size, np.uint16, offset)
        native(x, out)
        assert out.tobytes() == twin(x).view(np.uint16).tobytes()
    h = ref.f32_to_f16(x).view(np.uint16)
    if offset % 4 == 0:
        for native, twin in ((_native.f16_to_f32, ref.f16_to_f32), (_native.bf16_to_f32, ref.bf16_to_f32)):
            out = offset_view(x.size, np.float32, offset)
            native(h, out)
            assert out.tobytes() == twin(h).tobytes()
        # transpose: rows % 16 == 0 streams whole 64-byte lines of each destination row
        a = x[: 1024 * 1024].reshape(1024, 1024)
        for shape in ((1024, 1024), (512, 2048), (2048, 512)):
            a2 = a.reshape(shape)
            out = offset_view(a2.size, np.float32, offset).reshape(shape[::-1])
            _native.transpose2d(a2, out)
            assert out.tobytes() == np.ascontiguousarray(a2.T).tobytes()


def test_wrong_dtype_layout_or_size_is_rejected_before_any_work():
    x = np.zeros(8, np.float32)
    with pytest.raises(TypeError):
        _native.f32_to_f16(x.astype(np.float64), np.zeros(8, np.uint16))
    with pytest.raises(TypeError):
        _native.f32_to_f16(np.zeros(16, np.float32)[::2], np.zeros(8, np.uint16))
    with pytest.raises(TypeError):  # float16 output must be passed as its uint16 bits
        _native.f32_to_f16(x, np.zeros(8, np.float16))
    read_only = np.zeros(8, np.uint16)
    read_only.flags.writeable = False
    with pytest.raises(TypeError):
        _native.f32_to_bf16(x, read_only)
    with pytest.raises(ValueError, match="src has 8 elements but dst has 4"):
        _native.f32_to_f16(x, np.zeros(4, np.uint16))
    with pytest.raises(ValueError, match=r"dst must have shape \(3, 2\)"):
        _native.transpose2d(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="dtypes differ"):
        _native.transpose2d(np.zeros((2, 3), np.float32), np.zeros((3, 2), np.int32))
    with pytest.raises(ValueError, match="element size"):
        _native.transpose2d(np.zeros((2, 3), np.complex128), np.zeros((3, 2), np.complex128))
    with pytest.raises(TypeError):
        _native.transpose2d(np.zeros((4, 6), np.float32)[:, ::2], np.zeros((3, 4), np.float32))


def test_many_threads_at_once_give_the_single_thread_result():
    # 1.5M elements: each call also splits itself across the hardware threads
    x = random_f32(11, 1_500_000)
    a = x[: 1200 * 1250].reshape(1200, 1250)
    jobs = {
        "f16": lambda: repack.f32_to_f16(x),
        "bf16": lambda: repack.f32_to_bf16(x),
        "f16->f32": lambda: repack.to_f32(ref.f32_to_f16(x[:1 << 20])),
        "T": lambda: repack.transpose2d(a),
    }
    expected = {"f16": ref.f32_to_f16(x), "bf16": ref.f32_to_bf16(x),
                "f16->f32": ref.f16_to_f32(ref.f32_to_f16(x[:1 << 20])), "T": ref.transpose2d(a)}
    results = run_in_threads(jobs)
    assert len(results) == 8 and all(same(out, expected[name]) for name, out in results)


def test_simd_support_is_reported():
    assert isinstance(_native.simd_supported(), bool)
