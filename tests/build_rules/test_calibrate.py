"""calibrate: streams each weight layer's activation input into kiln's observers, one batch at a
time; the result equals the numpy twin fed the same batches, and its bytes are reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import tiny_onnx
from kiln.errors import StepError
from kiln.runtime.onnxrt import session
from kiln.native.calibration import Calibration, reference_stream
from kiln.rules import RunContext, get_rule


def calibrate(tmp_path: Path, name: str = "calibration.json", batch_size: int = 8, bins: int = 256, data: Path | None = None) -> Path:
    rule = get_rule("calibrate")
    model = tmp_path / "fp32.onnx"
    if not model.exists():
        tiny_onnx.tiny_model(model)
    data = data or tiny_onnx.data(tmp_path / "calib.npz")
    out = tmp_path / name
    params = rule.Params(inputs=tiny_onnx.INPUTS, batch_size=batch_size, max_length=16, bins=bins)
    rule().run({"model": [model], "data": [data]}, {"calibration": out}, params, RunContext(tmp_path, "test/calibrate"))
    return out


def activations(tmp_path: Path, names: list[str], batch_size: int) -> dict[str, list[np.ndarray]]:
    """Each batch's activations, read with a plain onnxruntime session on a model exposing them."""
    model = onnx.load(str(tmp_path / "fp32.onnx"))
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    sess = session(model.SerializeToString(), optimize=False)
    x = np.load(tmp_path / "calib.npz")["X"]
    found = {n: [] for n in names}
    for start in range(0, len(x), batch_size):
        for n, v in zip(names, sess.run(names, {"X": x[start : start + batch_size]}), strict=True):
            found[n].append(v)
    return found


def test_observes_the_input_of_every_weight_layer_exactly(tmp_path):
    out = calibrate(tmp_path, batch_size=8)
    cal = Calibration.from_json(out.read_text())
    assert sorted(cal.observers) == ["m2", "mixed2", "r3", "x2"]  # inputs of fc1, fc2, fc2_again, fc3
    for name, batches in activations(tmp_path, sorted(cal.observers), 8).items():
        whole = np.concatenate([b.ravel() for b in batches])
        assert (cal[name].min, cal[name].max) == (float(whole.min()), float(whole.max()))
        assert np.array_equal(cal[name].bins, reference_stream(batches, 256)), name
        assert int(cal[name].bins.sum()) == whole.size


def test_bytes_are_reproducible_and_extremes_do_not_depend_on_batching(tmp_path):
    a, b = calibrate(tmp_path, "a.json"), calibrate(tmp_path, "b.json")
    assert a.read_bytes() == b.read_bytes()
    one_batch = json.loads(calibrate(tmp_path, "c.json", batch_size=40).read_text())["tensors"]
    for name, state in json.loads(a.read_text())["tensors"].items():
        assert (state["min"], state["max"]) == (one_batch[name]["min"], one_batch[name]["max"])
        assert sum(state["bins"]) == sum(one_batch[name]["bins"])


def test_nan_activations_fail_with_the_tensor_named(tmp_path):
    x = np.load(tiny_onnx.data(tmp_path / "calib.npz"))["X"]
    x[3, 1, 0] = np.nan
    np.savez(tmp_path / "nan.npz", X=x)
    with pytest.raises(StepError, match=r"gives NaN on the calibration data in \d+ tensors \(first 'm2'"):
        calibrate(tmp_path, data=tmp_path / "nan.npz")


def test_a_model_without_weight_layers_has_nothing_to_calibrate(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4, tiny_onnx.K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "fp32.onnx"))
    with pytest.raises(StepError, match="no MatMul/Gemm node with a weight initializer"):
        calibrate(tmp_path)


def test_max_samples_stops_inside_the_last_batch(tmp_path):
    """40 samples, batches of 8, max_samples 13: the observers see samples 0..12 and no later one."""
    rule = get_rule("calibrate")
    tiny_onnx.tiny_model(tmp_path / "fp32.onnx")
    data = tiny_onnx.data(tmp_path / "calib.npz")
    params = rule.Params(inputs=tiny_onnx.INPUTS, batch_size=8, max_length=16, bins=256, max_samples=13)
    out = tmp_path / "calibration.json"
    info = rule().run({"model": [tmp_path / "fp32.onnx"], "data": [data]}, {"calibration": out}, params, RunContext(tmp_path, "test/calibrate"))
    assert info["samples"] == 13
    x = np.load(data)["X"]
    expected = Calibration(256)  # x2 (fc1's input, X flattened) fed batch by batch, as the rule should
    model = onnx.load(str(tmp_path / "fp32.onnx"))
    model.graph.output.extend([onnx.helper.make_tensor_value_info("x2", onnx.TensorProto.FLOAT, None)])
    for start in (0, 8):
        (x2,) = session(model.SerializeToString(), optimize=False).run(["x2"], {"X": x[start:min(start + 8, 13)]})
        expected.update("x2", x2)
    got = Calibration.from_json(out.read_text())
    assert (got["x2"].min, got["x2"].max) == (expected["x2"].min, expected["x2"].max)
    assert np.array_equal(got["x2"].bins, expected["x2"].bins)


def test_channels_output_holds_each_tensors_max_abs_per_channel_over_every_batch(tmp_path):
    """With a "channels" output the step also writes {tensor: [max |x| over all but the last axis]}."""
    rule = get_rule("calibrate")
    tiny_onnx.tiny_model(tmp_path / "fp32.onnx")
    data = tiny_onnx.data(tmp_path / "calib.npz")
    out = {"calibration": tmp_path / "calibration.json", "channels": tmp_path / "channels.json"}
    params = rule.Params(inputs=tiny_onnx.INPUTS, batch_size=8, max_length=16, bins=256)
    info = rule().run({"model": [tmp_path / "fp32.onnx"], "data": [data]}, out, params, RunContext(tmp_path, "test/calibrate"))
    found = json.loads(out["channels"].read_text())
    assert sorted(found) == ["m2", "mixed2", "r3", "x2"] and info["channel_tensors"] == 4
    for name, batches in activations(tmp_path, sorted(found), 8).items():
        whole = np.concatenate([b.reshape(-1, b.shape[-1]) for b in batches])
        assert found[name] == [float(v) for v in np.abs(whole).max(axis=0)], name
    assert out["calibration"].read_bytes() == calibrate(tmp_path, "without.json").read_bytes()  # the histograms are unchanged


def test_folding_a_batch_in_threads_gives_the_serial_result():
    """fold_batch spreads a batch's tensors over threads; every observer (and channel maximum) equals
    one folded serially, a name repeated within a batch included, and a thread's error reaches the caller."""
    from concurrent.futures import ThreadPoolExecutor

    from kiln.build_rules.calibrate import ChannelMaxima, fold_batch

    rng = np.random.default_rng(3)
    stream = [[(f"t{i}", (rng.standard_normal((4, 1 + i * 300)) * 2.0 ** (b + i)).astype(np.float32)) for i in range(6)] for b in range(5)]
    stream[2].append(("t1", rng.standard_normal((4, 301)).astype(np.float32) * 1e3))  # t1 twice in one batch: its range grows mid-batch
    serial, threaded = Calibration(256), Calibration(256)
    serial_channels, threaded_channels = ChannelMaxima("calibrate"), ChannelMaxima("calibrate")
    with ThreadPoolExecutor(4) as pool:
        for pairs in stream:
            for name, value in pairs:
                serial.update(name, value)
                serial_channels.update(name, value)
            fold_batch(pairs, threaded, threaded_channels, pool)
        assert threaded.to_json() == serial.to_json()
        assert threaded_channels.to_json() == serial_channels.to_json()
        with pytest.raises(StepError, match="channels"):
            fold_batch([("t0", np.zeros((4, 5), np.float32))], threaded, threaded_channels, pool)
