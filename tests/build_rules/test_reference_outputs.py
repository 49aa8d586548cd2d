"""reference_outputs: the source model run once on the validation data. Here: samples counted along
the batch axis, where each tensor's batch axis is recorded for validate, and outputs whose shape
is not the declared one refused (their rows would be cut wrong)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kiln.errors import StepError
from kiln.native.safetensors import safe_open
from kiln.rules import RunContext, get_rule
from workspaces import mlp

X = {"name": "x", "dtype": "float32", "shape": ["batch", 8]}
Y = {"name": "y", "dtype": "float32", "shape": ["batch", 4]}


def reference(tmp_path: Path, inputs: list[dict], outputs: list[dict], arrays: dict[str, np.ndarray], model: Path | None = None) -> tuple[dict, Path]:
    if model is None:
        model = tmp_path / "mlp.onnx"
        mlp(model, 0)
    np.savez(tmp_path / "data.npz", **arrays)
    rule = get_rule("reference_outputs")
    params = rule.Params(source={"kind": "onnx", "path": str(model)}, inputs=inputs, outputs=outputs, batch_size=4, max_length=16)
    out = tmp_path / "reference.safetensors"
    info = rule().run({"source": [model], "data": [tmp_path / "data.npz"]}, {"outputs": out}, params, RunContext(tmp_path, "m/t/reference_outputs"))
    return info, out


def _metadata(path: Path) -> dict | None:
    with safe_open(str(path)) as f:
        return f.metadata()


def test_tensors_batched_on_axis_0_carry_no_metadata(tmp_path: Path):
    """The layout every file had before batch axes existed: the same bytes, so no rebuild spreads."""
    info, out = reference(tmp_path, [X], [Y], {"x": np.ones((10, 8), np.float32)})
    assert info == {"samples": 10, "batches": 3}
    assert _metadata(out) is None


def test_other_batch_axes_are_recorded_and_samples_counted_along_them(tmp_path: Path):
    """x [8, batch] (a transposed MLP input) with a scalar beside it; y [4, batch]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = tmp_path / "t.onnx"
    weights = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["W", "x"], ["m"]), helper.make_node("Mul", ["m", "scale"], ["y"])], "t",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, "batch"]), helper.make_tensor_value_info("scale", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, "batch"])], [weights])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(model))
    inputs = [{"name": "x", "dtype": "float32", "shape": [8, "batch"]}, {"name": "scale", "dtype": "float32", "shape": []}]
    info, out = reference(tmp_path, inputs, [{"name": "y", "dtype": "float32", "shape": [4, "batch"]}],
                          {"x": np.ones((8, 10), np.float32), "scale": np.array(2.0, np.float32)}, model)
    assert info == {"samples": 10, "batches": 3}
    assert json.loads(_metadata(out)["batch_axes"]) == {"inputs": {"x": 1, "scale": None}, "outputs": {"y": 1}}


def test_an_output_that_is_not_the_declared_shape_is_refused(tmp_path: Path):
    with pytest.raises(StepError) as caught:
        reference(tmp_path, [X], [{"name": "y", "dtype": "float32", "shape": [4, "batch"]}], {"x": np.ones((3, 8), np.float32)})
    assert str(caught.value) == "m/t/reference_outputs: the source model's output 'y' has shape [3, 4] on batch 0; the manifest declares [4, 'batch'] with 3 samples on axis 1"
    with pytest.raises(StepError, match=r"output 'y' has shape \[4, 4\] on batch 0; the manifest declares \['batch', 4, 1\]"):
        reference(tmp_path, [X], [{"name": "y", "dtype": "float32", "shape": ["batch", 4, 1]}], {"x": np.ones((10, 8), np.float32)})
