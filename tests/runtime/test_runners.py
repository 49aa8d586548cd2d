"""kiln.runtime.runners: what every format's runner shares.

pick_outputs (a model's dict / tuple / single tensor matched to the manifest's outputs),
require_outputs, torch_runner (the calling convention torch programs and weights are validated
with) and the shape of onnx_latency's report entry (never its times).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from kiln.errors import StepError
from kiln.runtime import runners
from kiln.runtime.runners import Artifact, onnx_latency, pick_outputs, require_outputs, torch_runner


# ---- pick_outputs -----------------------------------------------------------------------------


def test_a_dict_result_is_picked_by_name_in_the_manifest_order():
    result = {"pooler_output": 2, "last_hidden_state": 1, "attentions": 3}
    assert pick_outputs(result, ["last_hidden_state", "pooler_output"]) == (1, 2)


def test_a_dict_like_model_output_is_picked_by_name():
    """transformers' ModelOutput is no dict, but has keys(): it is matched by name, not position."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    out = BaseModelOutputWithPooling(last_hidden_state=torch.ones(1), pooler_output=torch.zeros(1))
    picked = pick_outputs(out, ["pooler_output"])
    assert len(picked) == 1 and picked[0] is out.pooler_output


@pytest.mark.parametrize("result", [(1, 2), [1, 2]])
def test_a_sequence_result_is_matched_by_position(result):
    assert pick_outputs(result, ["a", "b"]) == (1, 2)


def test_a_single_tensor_is_the_one_output():
    tensor = torch.arange(3)
    picked = pick_outputs(tensor, ["logits"])
    assert len(picked) == 1 and picked[0] is tensor


def test_a_name_the_model_does_not_give_is_named_with_what_it_gives():
    with pytest.raises(StepError) as caught:
        pick_outputs({"logits": 1, "hidden": 2}, ["logits", "scores"])
    assert str(caught.value) == "source: output 'scores' is not produced by the model; it gives ['logits', 'hidden']"


@pytest.mark.parametrize("result, names, count", [((1, 2, 3), ["a", "b"], 3), (torch.ones(2), ["a", "b"], 1), ((1,), ["a", "b"], 1)])
def test_a_count_mismatch_names_both_counts(result, names, count):
    with pytest.raises(StepError) as caught:
        pick_outputs(result, names)
    assert str(caught.value) == f"source: the model returns {count} outputs but the manifest declares {len(names)}: {names}"


# ---- require_outputs --------------------------------------------------------------------------


def test_require_outputs_passes_when_every_name_is_known():
    require_outputs({"a", "b", "c"}, ["c", "a"], "ONNX", "m/t/validate")


def test_require_outputs_names_the_step_the_output_and_what_the_model_has():
    with pytest.raises(StepError) as caught:
        require_outputs({"z", "y"}, ["y", "logits", "more"], "OpenVINO", "m/ir/validate")
    assert str(caught.value) == "m/ir/validate: output 'logits' is not in the OpenVINO model; it has ['y', 'z']"
    assert caught.value.step == "m/ir/validate"


# ---- torch_runner -----------------------------------------------------------------------------


class _TwoInputs(torch.nn.Module):
    """Positional (a, b): a 2-layer net on a, minus b; records whether autograd was on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        self.grad_enabled: list[bool] = []

    def forward(self, a, b):
        self.grad_enabled.append(torch.is_grad_enabled())
        h = self.net(a)
        return h - b, h.sum(-1)


def test_torch_runner_passes_inputs_positionally_in_manifest_order():
    module = _TwoInputs().eval()
    a = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((5, 2)).astype(np.float32)
    run = torch_runner(module, ["a", "b"], ["diff", "total"])
    got = run({"b": b, "a": a})  # the feed's own order does not matter
    with torch.no_grad():
        h = module.net(torch.from_numpy(a)).numpy()
    assert list(got) == ["diff", "total"]
    assert np.allclose(got["diff"], h - b, atol=1e-6) and np.allclose(got["total"], h.sum(-1), atol=1e-6)


def test_torch_runner_runs_without_autograd_and_returns_numpy():
    module = _TwoInputs()  # parameters require grad: without inference mode .numpy() would fail
    run = torch_runner(module, ["a", "b"], ["diff", "total"])
    got = run({"a": np.ones((2, 3), np.float32), "b": np.zeros((2, 2), np.float32)})
    assert module.grad_enabled == [False]
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in got.values())
    assert torch.is_grad_enabled()  # the caller's mode is left as it was


def test_torch_runner_matches_a_dict_result_by_name():
    class Named(torch.nn.Module):
        def forward(self, x):
            return {"double": x * 2, "neg": -x}

    got = torch_runner(Named(), ["x"], ["neg"])({"x": np.arange(3, dtype=np.float32)})
    assert list(got) == ["neg"] and got["neg"].tolist() == [0.0, -1.0, -2.0]


# ---- Artifact ---------------------------------------------------------------------------------


def test_artifact_input_names_follow_the_manifest_order():
    artifact = Artifact(Path("m.onnx"), ["y"], "s", inputs=[{"name": "b", "dtype": "int64"}, {"name": "a"}])
    assert artifact.input_names == ["b", "a"]
    assert Artifact(Path("m.onnx"), ["y"], "s").input_names == []


# ---- onnx_latency -----------------------------------------------------------------------------


def _ids_model(path: Path) -> Path:
    """ids[batch, sequence] int64, mask[batch, 3] float -> y = ids * 2, z = mask + 1."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["ids", "ids"], ["y"]), helper.make_node("Add", ["mask", "one"], ["z"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_onnx_latency_runs_the_feed_it_is_given_without_resizing_it(tmp_path: Path, monkeypatch):
    """validate passes the first validation sample; the probe invents no shape (the old one forced
    dynamic axes to 128, which a model with a fixed internal size cannot run)."""
    fed: list[dict] = []
    real = runners.session

    class Spy:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def get_inputs(self):
            return self.inner.get_inputs()

        def run(self, names, feed):
            fed.append(feed)
            return self.inner.run(names, feed)

    monkeypatch.setattr(runners, "session", Spy)
    feed = {"ids": np.array([[1, 2, 3]], np.int64), "mask": np.array([[0.5, 0.25, 1.0]], np.float32), "unused": np.zeros(2)}
    result = onnx_latency(_ids_model(tmp_path / "m.onnx"), feed, runs=3, threads=1)
    assert set(result) == {"median_ms", "p10_ms", "runs", "threads", "shape"}
    assert result["runs"] == 3 and result["threads"] == 1
    assert result["shape"] == {"ids": [1, 3], "mask": [1, 3]}  # the data's own sequence length
    assert isinstance(result["median_ms"], float) and isinstance(result["p10_ms"], float)
    assert len(fed) == 5 + 3  # warm-ups, then the timed runs
    assert sorted(fed[-1]) == ["ids", "mask"] and fed[-1]["ids"] is feed["ids"] and fed[-1]["mask"] is feed["mask"]


def test_onnx_latency_names_an_input_the_feed_lacks(tmp_path: Path):
    with pytest.raises(ValueError, match="the validation data has no input 'mask'"):
        onnx_latency(_ids_model(tmp_path / "m.onnx"), {"ids": np.ones((1, 3), np.int64)}, runs=1, threads=1)
