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


def _save(nodes, inputs, outputs, inits, path: Path, name: str) -> Path:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def branch_model(path: Path, op: str = "MatMul", seed: int = 0) -> Path:
    """A model whose only weight ops sit inside an If: X -> If(sum(X) > 0) -> then: op(X, W_outer)
    (the weight an initializer of the main graph), else: op(X, W_local) (the branch's own initializer).
    op is "MatMul" (X[batch, K] -> Y[batch, N]) or "Conv" (X[batch, 3, 8, 8] -> Y[batch, 4, 8, 8], 3x3, pad 1).
    The condition is computed, so the outer graph has no weight op an int8 quantizer could take."""
    rng = np.random.default_rng(seed)
    shape, x_dims, y_dims = {"MatMul": ((K, N), ["batch", K], ["batch", N]),
                             "Conv": ((4, 3, 3, 3), ["batch", 3, 8, 8], ["batch", 4, 8, 8])}[op]
    attrs = {"pads": [1, 1, 1, 1]} if op == "Conv" else {}

    def branch(name: str, weight: str, local: list) -> onnx.GraphProto:
        node = helper.make_node(op, ["X", weight], [f"{name}_y"], name=f"{name}_{op.lower()}", **attrs)
        return helper.make_graph([node], name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)], local)

    w_outer, w_local = (numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), n) for n in ("W_outer", "W_local"))
    nodes = [
        helper.make_node("ReduceSum", ["X"], ["total"], name="total", keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"], name="positive"),
        helper.make_node("If", ["positive"], ["Y"], name="branch", then_branch=branch("then", "W_outer", []), else_branch=branch("else", "W_local", [w_local])),
    ]
    inits = [w_outer, numpy_helper.from_array(np.array(0, np.float32), "zero")]
    return _save(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_dims)],
                 [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_dims)], inits, path, "branch")


def weightless_model(path: Path) -> Path:
    """X[batch, K] -> Relu -> Add(X) -> activation x activation MatMul: nothing an int8 quantizer can take."""
    nodes = [
        helper.make_node("Relu", ["X"], ["r"], name="relu"),
        helper.make_node("Add", ["r", "X"], ["s"], name="add"),
        helper.make_node("Transpose", ["s"], ["st"], name="transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["s", "st"], ["Y"], name="gram"),
    ]
    return _save(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", K])],
                 [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "batch"])], [], path, "weightless")


def lstm_model(path: Path, hidden: int = 16, seed: int = 0) -> Path:
    """X[seq, batch, K] -> LSTM (weights W, R, B initializers) -> Y[seq, 1, batch, hidden]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.2).astype(np.float32), n)
             for n, s in (("W", (1, 4 * hidden, K)), ("R", (1, 4 * hidden, hidden)), ("B", (1, 8 * hidden)))]
    nodes = [helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y"], name="lstm", hidden_size=hidden)]
    return _save(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["seq", "batch", K])],
                 [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["seq", 1, "batch", hidden])], inits, path, "lstm")
