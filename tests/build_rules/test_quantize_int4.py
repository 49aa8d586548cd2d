"""quantize_int4: weight layers become MatMulNBits with kiln's packing, the rest of the graph is
untouched, and onnxruntime computes the same function with the dequantized weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import tiny_onnx
from kiln.native import repack
from kiln.errors import StepError
from kiln.runtime.onnxrt import session
from kiln.rules import RunContext, get_rule


def quantize(tmp_path: Path, name: str = "q4.onnx", **params) -> Path:
    rule = get_rule("quantize_int4")
    source = tmp_path / "fp32.onnx"
    if not source.exists():
        tiny_onnx.tiny_model(source)
    out = tmp_path / name
    rule().run({"model": [source]}, {"model": out}, rule.Params(**params), RunContext(tmp_path, "test/quantize_int4"))
    return out


def dequantized_model(tmp_path: Path, block_size: int, symmetric: bool) -> Path:
    """The fp32 model with every weight replaced by dequantize(quantize_int4(weight))."""
    model = onnx.load(str(tiny_onnx.tiny_model(tmp_path / "fp32.onnx")))
    for init in model.graph.initializer:
        if init.name in ("W1", "W2", "W3"):
            w = numpy_helper.to_array(init)
            kn = w.T if init.name == "W3" else w  # fc3 is transB: its W[K, N] is W3^T
            B, scales, zp = repack.quantize_int4(np.ascontiguousarray(kn), block_size, symmetric=symmetric)
            back = repack.dequantize_int4(B, scales, zp, kn.shape[0])
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(back.T if init.name == "W3" else back), init.name))
    path = tmp_path / "dequantized.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_weight_layers_become_matmulnbits_computing_the_dequantized_model(tmp_path, block_size, symmetric):
    out = quantize(tmp_path, block_size=block_size, symmetric=symmetric, accuracy_level=0)
    model = onnx.load(str(out))
    ops = {n.name: n.op_type for n in model.graph.node}
    assert [ops[k] for k in ("fc1", "fc2", "fc2_again", "fc3")] == ["MatMulNBits"] * 4
    assert ops["scores"] == ops["mix"] == "MatMul"  # activation x activation: not a weight layer
    names = {t.name for t in model.graph.initializer}
    assert not names & {"W1", "W2", "W3"} and "b1" in names and "b3" in names  # biases move to MatMulNBits
    assert sum(n.startswith("W2_Q4") for n in names) == 1  # the shared weight is packed once
    x = np.random.default_rng(3).standard_normal((5, 4, tiny_onnx.K)).astype(np.float32)
    (got,) = session(out).run(["Y"], {"X": x})
    (want,) = session(dequantized_model(tmp_path, block_size, symmetric)).run(["Y"], {"X": x})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_accuracy_level_4_only_adds_the_int8_activation_rounding(tmp_path):
    """Level 4 quantizes activations to int8 inside the kernel: close to, not equal to, level 0."""
    out = quantize(tmp_path, accuracy_level=4)
    x = np.random.default_rng(4).standard_normal((5, 4, tiny_onnx.K)).astype(np.float32)
    (got,) = session(out).run(["Y"], {"X": x})
    (want,) = session(dequantized_model(tmp_path, 32, False)).run(["Y"], {"X": x})
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert 0.999 < cos.min() and not np.array_equal(got, want)


def test_excluded_nodes_stay_fp32_and_bytes_are_reproducible(tmp_path):
    a = quantize(tmp_path, "a.onnx", exclude_nodes=["fc3"])
    b = quantize(tmp_path, "b.onnx", exclude_nodes=["fc3"])
    assert a.read_bytes() == b.read_bytes()
    ops = {n.name: n.op_type for n in onnx.load(str(a)).graph.node}
    assert ops["fc3"] == "Gemm" and ops["fc1"] == "MatMulNBits"


def test_unknown_excluded_node_is_named(tmp_path):
    with pytest.raises(StepError, match=r"options.exclude_nodes: 'fc9' is not a node of the model; weight layers it can exclude: fc1, fc2, fc2_again, fc3"):
        quantize(tmp_path, exclude_nodes=["fc9"])


def test_the_int4_model_passes_the_full_checker_and_counts_its_layers(tmp_path):
    rule = get_rule("quantize_int4")
    out = tmp_path / "q4.onnx"
    facts = rule().run({"model": [tiny_onnx.tiny_model(tmp_path / "fp32.onnx")]}, {"model": out}, rule.Params(), RunContext(tmp_path, "test/quantize_int4"))
    onnx.checker.check_model(str(out), full_check=True)
    assert facts["quantized_ops"] == {"MatMulNBits": 4}


@pytest.mark.parametrize("model, found, hint", [
    ("weightless", "none", "int4 rewrites top-level MatMul/Gemm layers with a 2-D float weight only"),
    ("branch", r"MatMul: 2 \(2 inside If/Loop/Scan bodies\)", "int4 rewrites top-level MatMul/Gemm layers"),
])
def test_a_model_with_no_weight_layer_fails_naming_what_it_has(tmp_path, model, found, hint):
    source = getattr(tiny_onnx, f"{model}_model")(tmp_path / "m.onnx")
    rule = get_rule("quantize_int4")
    with pytest.raises(StepError, match=f"^test/quantize_int4: int4 found no weight layer to quantize; the graph's ops with weights: {found}: {hint}"):
        rule().run({"model": [source]}, {"model": tmp_path / "q4.onnx"}, rule.Params(), RunContext(tmp_path, "test/quantize_int4"))


def test_excluding_every_layer_fails_instead_of_publishing_fp32(tmp_path):
    with pytest.raises(StepError, match=r"options.exclude_nodes \(4 nodes\) leaves none of them"):
        quantize(tmp_path, exclude_nodes=["fc1", "fc2", "fc2_again", "fc3"])
