"""A small fp32 ONNX model with every kind of layer quantization meets: a Gemm with bias, a MatMul
on a 3-D activation, a Gemm with transB = 1, a weight shared by two layers, and an activation x
activation MatMul (attention scores), which no scheme quantizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

K, H, N = 64, 48, 40


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W1": rng.standard_normal((K, H)).astype(np.float32) * 0.2, "b1": rng.standard_normal(H).astype(np.float32),
        "W2": rng.standard_normal((H, H)).astype(np.float32) * 0.2,
        "W3": rng.standard_normal((N, H)).astype(np.float32) * 0.2, "b3": rng.standard_normal(N).astype(np.float32),
    }


def tiny_model(path: Path, seed: int = 0) -> Path:
    """X[batch, 4, K] -> (per row) Gemm(W1, b1) -> Relu -> MatMul(W2) -> MatMul(W2 again) -> scores
    = H @ H^T -> Softmax -> @ H -> Gemm(W3^T, b3, transB) -> Y[batch * 4, N]."""
    nodes = [
        helper.make_node("Reshape", ["X", "flat"], ["x2"], name="flatten"),
        helper.make_node("Gemm", ["x2", "W1", "b1"], ["g1"], name="fc1"),
        helper.make_node("Relu", ["g1"], ["r1"], name="relu"),
        helper.make_node("Reshape", ["r1", "rows"], ["r3"], name="unflatten"),
        helper.make_node("MatMul", ["r3", "W2"], ["m2"], name="fc2"),
        helper.make_node("MatMul", ["m2", "W2"], ["m3"], name="fc2_again"),
        helper.make_node("Transpose", ["m3"], ["m3t"], name="transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["m3", "m3t"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "m3"], ["mixed"], name="mix"),
        helper.make_node("Reshape", ["mixed", "flat_h"], ["mixed2"], name="flatten_again"),
        helper.make_node("Gemm", ["mixed2", "W3", "b3"], ["Y"], name="fc3", transB=1),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in weights(seed).items()] + [
        numpy_helper.from_array(np.array([-1, K], np.int64), "flat"),
        numpy_helper.from_array(np.array([-1, 4, H], np.int64), "rows"),
        numpy_helper.from_array(np.array([-1, H], np.int64), "flat_h"),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def data(path: Path, samples: int = 40, seed: int = 1) -> Path:
    """Calibration / validation arrays for the tiny model, one outlier sample to stretch the ranges."""
    x = np.random.default_rng(seed).standard_normal((samples, 4, K)).astype(np.float32)
    x[7, 2, :5] *= 6.0
    np.savez(path, X=x)
    return path


INPUTS = [{"name": "X", "dtype": "float32", "shape": ["batch", 4, K]}]
