"""kiln.native.repack int8 / int4 quantization against the numpy twins (kiln.native.twins), bit for bit on
both kernel paths, and against onnxruntime: its quantizer's bytes and its MatMulNBits / QuantizeLinear
operators."""

from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_in_threads
from onnx import TensorProto, helper

from kiln import _native
from kiln.native import repack
from kiln.native import twins as ref

PATHS = [pytest.param(True, id="simd"), pytest.param(False, id="scalar")]
INT8_MODES = [(True, np.int8), (False, np.uint8), (False, np.int8)]  # (symmetric, dtype)
AXES = [None, 0, 1]
SHAPES = [(1, 1), (3, 5), (17, 33), (64, 127), (5, 1000), (2, 16)]


def same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def weights(seed: int, shape) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.integers(-6, 4, (shape[0],) + (1,) * (len(shape) - 1))  # rows of very different ranges
    w = (rng.standard_normal(shape) * scale).astype(np.float32)
    if seed % 2:
        w = np.abs(w)  # all-positive weights: the asymmetric range starts at 0
    return w


def check_int8(w, symmetric, dtype, axis, simd):
    got = repack.quantize_int8(w, symmetric=symmetric, axis=axis, dtype=dtype, simd=simd)
    want = ref.quantize_int8(w, symmetric=symmetric, axis=axis, dtype=dtype)
    assert all(same(g, e) for g, e in zip(got, want)), (symmetric, dtype, axis)
    back = repack.dequantize_int8(*got, axis=axis, simd=simd)
    assert same(back, ref.dequantize_int8(*want, axis=axis))
    return got


# ---------------------------------------------------------------- int8

@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("symmetric,dtype", INT8_MODES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(2))
def test_int8_random_matches_the_twin(seed, shape, symmetric, dtype, axis, simd):
    check_int8(weights(seed, shape), symmetric, dtype, axis, simd)


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("symmetric,dtype", INT8_MODES)
def test_int8_edge_values(symmetric, dtype, axis, simd):
    nan, inf = np.float32(np.nan), np.float32(np.inf)
    rows = [
        [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 0.0],   # scale 1: w / scale lands on ties
        [0.0] * 9,                                           # zero range: scale 1, q = zp
        [-0.0] * 9,
        [1e-45, -1e-45, 1e-40, 0.0, 1e-45, 2e-45, 0.0, 0.0, 0.0],  # subnormal range
        [nan, 1.0, -2.0, nan, 3.0, 0.25, nan, -0.0, 1e-3],   # NaNs are ignored and quantize to zp
        [nan] * 9,
        [inf, 1.0, -1.0, 0.0, 2.0, 3.0, 4.0, 5.0, 6.0],      # Inf range: defined, if useless
        [-inf, inf, 1.0, 0.0, -1.0, 2.0, 3.0, 4.0, 5.0],
        [3.4028235e38, -3.4028235e38, 1.0, 0, 0, 0, 0, 0, 0],  # mx - mn overflows
        [255.0, 0.0, 0.5, 1.5, 254.5, 127.5, 128.5, 100.0, 3.0],  # asymmetric uint8 scale 1: ties
    ]
    w = np.array(rows, np.float32)
    with np.errstate(all="ignore"):
        q, scale, zp = check_int8(w, symmetric, dtype, axis, simd)
    if axis == 0:
        assert scale[1] == 1.0 and np.all(q[1] == zp[1])
        if symmetric:
            assert q[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 4, 0]  # half to even
        finite = np.isfinite(w[4])
        back = repack.dequantize_int8(q, scale, zp, axis=0)
        assert np.all(back[4][~finite] == 0)


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("symmetric,dtype", INT8_MODES)
def test_int8_large_inputs_split_across_threads_match(symmetric, dtype, axis, simd):
    w = weights(4, (1030, 1021))  # > 2^20 elements: the binding splits the work
    w[5, 7] = np.nan
    check_int8(w, symmetric, dtype, axis, simd)


def test_int8_any_rank_per_tensor_and_bad_arguments():
    w = weights(0, (4, 6, 5))
    q, scale, zp = repack.quantize_int8(w)
    assert q.shape == w.shape and scale.shape == () and zp.shape == () and q.dtype == np.int8
    assert all(same(a, b) for a, b in zip((q, scale, zp), ref.quantize_int8(w)))
    with pytest.raises(ValueError, match="symmetric"):
        repack.quantize_int8(w, dtype=np.uint8)
    with pytest.raises(ValueError, match="axis"):
        repack.quantize_int8(w, axis=0)
    with pytest.raises(TypeError, match="float32"):
        repack.quantize_int8(w.astype(np.float16))
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="scales has 1 elements, expected 2"):
        _native.quantize_int8(x, np.zeros((2, 4), np.int8), np.zeros(1, np.float32), np.zeros(1, np.int8), 0, True)
    with pytest.raises(ValueError, match="must both be int8 or both uint8"):
        _native.quantize_int8(x, np.zeros((2, 4), np.int8), np.zeros(1, np.float32), np.zeros(1, np.uint8), -1, True)
    with pytest.raises(TypeError):
        _native.quantize_int8(x.T, np.zeros((4, 2), np.int8), np.zeros(1, np.float32), np.zeros(1, np.int8), -1, True)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_empty_weights(shape):
    w = np.zeros(shape, np.float32)
    for axis in AXES:
        for symmetric, dtype in INT8_MODES:
            check_int8(w, symmetric, dtype, axis, True)
    for symmetric in (False, True):
        check_int4(w, 32, symmetric, True)


def test_read_only_inputs_are_accepted():
    w = weights(1, (8, 40))
    w.flags.writeable = False  # e.g. weights mapped from a file
    q, scale, zp = repack.quantize_int8(w, symmetric=False, axis=1)
    for a in (q, scale, zp):
        a.flags.writeable = False
    assert same(repack.dequantize_int8(q, scale, zp, axis=1), ref.dequantize_int8(q, scale, zp, axis=1))
    assert all(same(a, b) for a, b in zip(repack.quantize_int4(w.T.copy(), 16), ref.quantize_int4_matmulnbits(w.T, 16)))
    frozen = np.ascontiguousarray(w.T)
    frozen.flags.writeable = False
    assert all(same(a, b) for a, b in zip(repack.quantize_int4(frozen, 16), ref.quantize_int4_matmulnbits(frozen, 16)))


def test_0d_weight_per_tensor():
    q, scale, zp = repack.quantize_int8(np.float32(3.0))
    assert q.shape == () and q == 127 and all(same(a, b) for a, b in zip((q, scale, zp), ref.quantize_int8(np.float32(3.0))))
    assert repack.dequantize_int8(q, scale, zp).shape == ()


def test_int8_per_tensor_matches_onnxruntime_dynamic_quantize_linear():
    """Asymmetric uint8 per tensor is ONNX DynamicQuantizeLinear: onnxruntime's gives the same bytes."""
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zp"])
    graph = helper.make_graph([node], "dql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [None, None]),
                               helper.make_tensor_value_info("scale", TensorProto.FLOAT, []),
                               helper.make_tensor_value_info("zp", TensorProto.UINT8, [])])
    sess = session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    for seed in range(6):
        w = weights(seed, (33, 70))
        y, scale, zp = sess.run(None, {"x": w})
        q, s, z = repack.quantize_int8(w, symmetric=False)
        assert same(q, y) and same(s, scale) and same(z, zp), seed


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("symmetric,dtype", INT8_MODES)
def test_int8_per_channel_matches_onnxruntime_quantize_linear(symmetric, dtype, axis):
    """Given our scales and zero points, onnxruntime's QuantizeLinear (axis) gives our q."""
    w = weights(3, (24, 40))
    q, scale, zp = repack.quantize_int8(w, symmetric=symmetric, axis=axis, dtype=dtype)
    elem = TensorProto.INT8 if dtype == np.int8 else TensorProto.UINT8
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], axis=axis)
    graph = helper.make_graph([node], "ql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(w.shape))],
                              [helper.make_tensor_value_info("y", elem, list(w.shape))],
                              [onnx.numpy_helper.from_array(scale, "s"), onnx.numpy_helper.from_array(zp, "z")])
    (y,) = session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])).run(None, {"x": w})
    assert same(q, y)


# ---------------------------------------------------------------- int4 (MatMulNBits)

INT4_SHAPES = [(1, 1), (16, 3), (33, 17), (64, 16), (70, 5), (100, 24), (257, 9), (512, 33)]


def check_int4(w, block_size, symmetric, simd):
    got = repack.quantize_int4(w, block_size, symmetric=symmetric, simd=simd)
    want = ref.quantize_int4_matmulnbits(w, block_size, symmetric=symmetric)
    assert all(same(g, e) for g, e in zip(got, want)), (w.shape, block_size, symmetric)
    return got


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("shape", INT4_SHAPES)
@pytest.mark.parametrize("seed", range(2))
def test_int4_random_matches_the_twin(seed, shape, block_size, symmetric, simd):
    w = weights(seed, shape[::-1]).T.copy()  # columns of very different ranges
    B, scales, zero_points = check_int4(w, block_size, symmetric, simd)
    n_blocks = -(-shape[0] // block_size)
    assert B.shape == (shape[1], n_blocks, block_size // 2) and scales.shape == (shape[1] * n_blocks,)
    if symmetric:
        assert zero_points is None
    else:
        assert zero_points.shape == (shape[1] * ((n_blocks + 1) // 2),)


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_int4_edge_values(symmetric, simd):
    nan, inf = np.nan, np.inf
    K = 40  # block 32 plus a padded block of 8
    cols = [
        np.zeros(K), -np.zeros(K),
        np.r_[15.0, 0.5, 1.5, 2.5, 7.5, 14.5, np.zeros(K - 6)],  # asym scale 1: x + zp lands on .5 ties
        np.r_[-8.0, 3.5, -4.5, 0.5, np.zeros(K - 4)],            # sym scale 1 (m = -8): ties at .5
        np.r_[nan, 1.0, -2.0, nan, np.ones(K - 4)],
        np.full(K, nan),
        np.r_[inf, 1.0, -1.0, np.zeros(K - 3)],
        np.r_[-inf, inf, np.zeros(K - 2)],
        np.r_[1e-45, -1e-45, 1e-40, np.zeros(K - 3)],
        np.r_[3.4028235e38, -3.4028235e38, np.zeros(K - 2)],
        np.linspace(-1, 1, K),
    ]
    w = np.stack(cols, axis=1).astype(np.float32)
    with np.errstate(all="ignore"):
        B, scales, zp = check_int4(w, 32, symmetric, simd)
    q = np.stack([B & 15, B >> 4], -1).reshape(w.shape[1], -1)
    assert np.all(q[:, K:] == 0)  # padding nibbles
    if not symmetric:
        assert scales[2 * 2] == 1.0 and q[2, :6].tolist() == [15, 1, 2, 3, 8, 15]  # half away from zero


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("shape", [(70, 3), (128, 64), (33, 17), (1000, 31), (256, 256), (1, 5)])
def test_int4_bytes_equal_onnxruntime_quantizer(shape, block_size, symmetric):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    K, N = shape
    w = weights(K + N, (K, N))
    n_blocks = -(-K // block_size)
    packed = np.zeros((N, n_blocks, block_size // 2), np.uint8)
    ort_scales = np.zeros((N, n_blocks), np.float32)
    ort_zp = np.zeros((N, (n_blocks + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, w, ort_scales, ort_zp, block_size, N, K, symmetric)
    B, scales, zp = repack.quantize_int4(w, block_size, symmetric=symmetric)
    if K % 2:
        # onnxruntime leaves a stale value in the padding nibble after an odd K (never read); we write 0
        packed[:, -1, (K % block_size) // 2] &= 0x0F
    assert same(B, packed) and same(scales, ort_scales.reshape(-1))
    if not symmetric:
        assert same(zp, ort_zp.reshape(-1))


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def matmulnbits_model(K, N, block_size, B, scales, zero_points) -> onnx.ModelProto:
    inits = [onnx.numpy_helper.from_array(B, "B"), onnx.numpy_helper.from_array(scales, "scales")]
    inputs = ["A", "B", "scales"]
    if zero_points is not None:
        inits.append(onnx.numpy_helper.from_array(zero_points, "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=K, N=N, bits=4, block_size=block_size)
    graph = helper.make_graph([node], "mnb", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("block_size", [32, 64, 128])
@pytest.mark.parametrize("K,N", [(100, 24), (64, 7), (300, 33)])
def test_int4_runs_in_onnxruntime_matmulnbits(K, N, block_size, symmetric):
    """End to end: onnxruntime's MatMulNBits on our B/scales/zero_points computes A @ dequantize(ours)."""
    rng = np.random.default_rng(K * N + block_size)
    w = rng.standard_normal((K, N)).astype(np.float32)
    B, scales, zp = repack.quantize_int4(w, block_size, symmetric=symmetric)
    w_deq = repack.dequantize_int4(B, scales, zp, K)
    # asymmetric: half a step; symmetric: the side opposite the largest magnitude clips at +7 steps
    bound = np.repeat(np.abs(scales).reshape(N, -1), block_size, axis=1)[:, :K].T * (1.0 if symmetric else 0.5)
    assert w_deq.shape == (K, N) and np.all(np.abs(w_deq - w) <= bound * 1.0001)
    sess = session(matmulnbits_model(K, N, block_size, B, scales, zp))
    a = rng.standard_normal((5, K)).astype(np.float32)
    (y,) = sess.run(None, {"A": a})
    expected = a.astype(np.float64) @ w_deq.astype(np.float64)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(a).sum(1, keepdims=True).max())
    # A = I reads the dequantized weight back out of onnxruntime, element by element
    (y_eye,) = sess.run(None, {"A": np.eye(K, dtype=np.float32)})
    np.testing.assert_allclose(y_eye, w_deq, rtol=1e-6, atol=1e-7)


def test_int4_bad_arguments():
    w = np.zeros((64, 8), np.float32)
    for bs in (8, 48, 512):
        with pytest.raises(ValueError, match="block_size"):
            repack.quantize_int4(w, bs)
    with pytest.raises(ValueError, match="block_size"):
        _native.quantize_int4_matmulnbits(w, 24, False, np.zeros(1, np.uint8), np.zeros(1, np.float32), np.zeros(1, np.uint8))
    with pytest.raises(ValueError, match="B has 10 elements, expected 256"):
        _native.quantize_int4_matmulnbits(w, 32, True, np.zeros(10, np.uint8), np.zeros(16, np.float32), np.zeros(0, np.uint8))
    with pytest.raises(ValueError, match="zero_points has 0 elements, expected 8"):
        _native.quantize_int4_matmulnbits(w, 32, False, np.zeros(256, np.uint8), np.zeros(16, np.float32), np.zeros(0, np.uint8))
    with pytest.raises(TypeError):
        _native.quantize_int4_matmulnbits(w.astype(np.float64), 32, True, np.zeros(256, np.uint8), np.zeros(16, np.float32),
                                          np.zeros(0, np.uint8))
    with pytest.raises(TypeError, match="float32"):
        repack.quantize_int4(w.astype(np.float16))


# ---------------------------------------------------------------- threads

def test_many_threads_at_once_give_the_single_thread_result():
    w = weights(8, (1024, 1100))  # > 2^20 elements: each call also splits itself across threads
    jobs = {
        "int8-row": (lambda: repack.quantize_int8(w, axis=0), ref.quantize_int8(w, axis=0)),
        "int8-col": (lambda: repack.quantize_int8(w, symmetric=False, axis=1), ref.quantize_int8(w, symmetric=False, axis=1)),
        "int8-tensor": (lambda: repack.quantize_int8(w), ref.quantize_int8(w)),
        "int4": (lambda: repack.quantize_int4(w, 32), ref.quantize_int4_matmulnbits(w, 32)),
    }
    results = run_in_threads({name: job for name, (job, _) in jobs.items()})
    assert len(results) == 8
    assert all(all(same(g, e) for g, e in zip(out, jobs[name][1])) for name, out in results)
