"""kiln.formats: the registry of target formats and each format's runtime verbs.

The registry (FORMATS): names, order (the manifest's target union), tags, validation tools and the
import-time check that catches a format added without them; the validate rule's tool list. Each
format's open_runner on tiny artifacts made here: ONNX in onnxruntime, the same model's OpenVINO IR,
TorchScript and torch.export programs; a torch.save'd state_dict in its source architecture;
TensorRT without a GPU.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln.formats
from kiln.base.cuda import unavailable_reason
from kiln.build_rules.validate import Validate
from kiln.errors import StepError
from kiln.formats import FORMATS, _check_registry, target_format
from kiln.formats.base import TargetFormat
from kiln.runtime.runners import Artifact, RuntimeUnavailable
from kiln.schema.fields import TargetBase

NAMES = ("onnx", "safetensors", "torchscript", "torch_export", "openvino", "tensorrt", "pytorch", "coreml", "tflite", "savedmodel", "pmml")
STEP = "m/t/validate"


# ---- the registry -----------------------------------------------------------------------------


def test_the_registry_lists_every_format_in_the_manifest_union_order():
    from kiln.define.spec import Target

    assert tuple(fmt.format for fmt in FORMATS) == NAMES
    union = typing.get_args(typing.get_args(Target)[0])  # Annotated[Union[...], Field(discriminator)]
    assert union == tuple(fmt.Target for fmt in FORMATS)
    assert all(target_format(name).format == name for name in NAMES)


@pytest.mark.parametrize("fmt", FORMATS, ids=NAMES)
def test_each_format_is_tagged_with_its_own_name_and_says_what_validates_it(fmt: TargetFormat):
    assert typing.get_args(fmt.Target.model_fields["format"].annotation) == (fmt.format,)
    assert fmt.Target.model_validate({"format": fmt.format}).format == fmt.format  # every other key has a default
    assert fmt.validation_tools and all(isinstance(tool, str) and tool for tool in fmt.validation_tools)


@pytest.mark.parametrize("fmt", FORMATS, ids=NAMES)
def test_the_validate_step_is_keyed_by_the_format_runtime_and_numpy(fmt: TargetFormat):
    assert Validate.tools_for({"format": fmt.format}) == (*fmt.validation_tools, "numpy")


def test_validation_tools_are_the_runtimes_the_artifacts_run_in():
    tools = {fmt.format: fmt.validation_tools for fmt in FORMATS}
    assert tools == {"onnx": ("onnxruntime",), "safetensors": ("torch", "transformers"), "torchscript": ("torch",),
                     "torch_export": ("torch",), "openvino": ("openvino",), "tensorrt": ("tensorrt",),
                     "pytorch": ("torch", "transformers"), "coreml": ("coremltools",), "tflite": ("ai-edge-litert",),
                     "savedmodel": ("tensorflow", "tensorflow-cpu"), "pmml": ("jpmml_evaluator", "py4j", "pandas", "java")}


class _FakeTarget(TargetBase):
    format: Literal["fake"]


class _Fake(TargetFormat):
    """A format as someone might add it, forgetting validation_tools."""

    format = "fake"
    Target = _FakeTarget

    def chain(self, planner, name, target):
        pass

    def open_runner(self, artifact):
        return lambda feed: {}


def _register(monkeypatch, *formats: TargetFormat) -> None:
    monkeypatch.setattr(kiln.formats, "FORMATS", formats)
    monkeypatch.setattr(kiln.formats, "_BY_NAME", {fmt.format: fmt for fmt in formats})


def test_a_format_without_validation_tools_fails_the_registry_check(monkeypatch):
    _register(monkeypatch, *FORMATS, _Fake())
    with pytest.raises(RuntimeError, match=r"^_Fake does not say which tools validate it \(validation_tools\)$"):
        _check_registry()


def test_a_format_with_validation_tools_passes_the_registry_check(monkeypatch):
    class Declared(_Fake):
        validation_tools = ("fakert",)

    _register(monkeypatch, *FORMATS, Declared())
    _check_registry()


def test_a_format_tagged_with_another_name_fails_the_registry_check(monkeypatch):
    class Mistagged(_Fake):
        format = "other"
        validation_tools = ("fakert",)

    _register(monkeypatch, *FORMATS, Mistagged())
    with pytest.raises(RuntimeError, match="Mistagged.Target is not tagged format = 'other'"):
        _check_registry()


def test_two_formats_with_one_name_fail_the_registry_check(monkeypatch):
    monkeypatch.setattr(kiln.formats, "FORMATS", (*FORMATS, FORMATS[0]))
    with pytest.raises(RuntimeError, match="two target formats share a name"):
        _check_registry()


# ---- ONNX and OpenVINO ------------------------------------------------------------------------

W = (np.arange(12, dtype=np.float32).reshape(3, 4) - 5.0) / 10.0
X = np.array([[1.0, -2.0, 3.0], [0.5, 1.0, -1.0], [-1.0, 0.0, 2.0]], np.float32)


def _tiny_onnx(path: Path) -> Path:
    """x[batch, 3] -> y = x @ W, z = relu(y)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Relu", ["y"], ["z"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(W, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_the_onnx_runner_returns_the_declared_outputs(tmp_path: Path):
    run = target_format("onnx").open_runner(Artifact(_tiny_onnx(tmp_path / "model.onnx"), ["z", "y"], STEP))
    got = run({"x": X})
    assert list(got) == ["z", "y"]
    assert np.allclose(got["y"], X @ W, atol=1e-6) and np.allclose(got["z"], np.maximum(X @ W, 0), atol=1e-6)
    assert (got["y"] < 0).any()  # so z really is another output


def test_the_onnx_runner_refuses_an_output_the_model_lacks(tmp_path: Path):
    with pytest.raises(StepError) as caught:
        target_format("onnx").open_runner(Artifact(_tiny_onnx(tmp_path / "model.onnx"), ["y", "logits"], STEP))
    assert str(caught.value) == f"{STEP}: output 'logits' is not in the ONNX model; it has ['y', 'z']"


def test_the_onnx_runner_refuses_a_file_that_is_not_onnx(tmp_path: Path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"this is not a protobuf\n\x00\x01 at all")
    with pytest.raises(StepError) as caught:
        target_format("onnx").open_runner(Artifact(path, ["y"], STEP))
    message = str(caught.value)
    assert message.startswith(f"{STEP}: onnxruntime cannot load model.onnx: ") and "\n" not in message


def _ir(tmp_path: Path) -> Path:
    import openvino as ov

    xml = tmp_path / "model.xml"
    ov.save_model(ov.convert_model(str(_tiny_onnx(tmp_path / "model.onnx"))), str(xml), compress_to_fp16=False)
    return xml


def test_the_openvino_runner_gives_the_onnx_outputs(tmp_path: Path):
    xml = _ir(tmp_path)
    expected = target_format("onnx").open_runner(Artifact(tmp_path / "model.onnx", ["y", "z"], STEP))({"x": X})
    got = target_format("openvino").open_runner(Artifact(xml, ["y", "z"], STEP))({"x": X})
    assert list(got) == ["y", "z"]
    for name in ("y", "z"):
        assert got[name].shape == expected[name].shape and np.abs(got[name] - expected[name]).max() <= 1e-5


def test_the_openvino_runner_refuses_an_output_the_ir_lacks(tmp_path: Path):
    with pytest.raises(StepError) as caught:
        target_format("openvino").open_runner(Artifact(_ir(tmp_path), ["logits"], STEP))
    assert str(caught.value) == f"{STEP}: output 'logits' is not in the OpenVINO model; it has ['y', 'z']"


def test_the_openvino_runner_refuses_a_damaged_ir(tmp_path: Path):
    xml = tmp_path / "model.xml"
    xml.write_text("<net name='broken'>")
    with pytest.raises(StepError) as caught:
        target_format("openvino").open_runner(Artifact(xml, ["y"], STEP))
    assert str(caught.value).startswith(f"{STEP}: OpenVINO cannot load model.xml: ") and "\n" not in str(caught.value)


# ---- torch programs ---------------------------------------------------------------------------


class _TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))

    def forward(self, a, b):
        h = self.net(a)
        return h - b, h.sum(-1)


def _save_program(kind: str, path: Path, module: torch.nn.Module, args: tuple) -> Path:
    if kind == "torchscript":
        torch.jit.save(torch.jit.trace(module, args), str(path))
    else:
        torch.export.save(torch.export.export(module, args), str(path))
    return path


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("kind, file", [("torchscript", "model.pt"), ("torch_export", "model.pt2")])
def test_a_torch_program_runs_with_inputs_in_manifest_order(tmp_path: Path, kind: str, file: str):
    module = _TwoInputs().eval()
    a = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((2, 2)).astype(np.float32)
    path = _save_program(kind, tmp_path / file, module, (torch.from_numpy(a), torch.from_numpy(b)))
    artifact = Artifact(path, ["diff", "total"], STEP, inputs=[{"name": "a", "dtype": "float32"}, {"name": "b", "dtype": "float32"}])
    got = target_format(kind).open_runner(artifact)({"b": b, "a": a})
    with torch.no_grad():
        diff, total = module(torch.from_numpy(a), torch.from_numpy(b))
    assert list(got) == ["diff", "total"] and all(isinstance(v, np.ndarray) for v in got.values())
    assert np.allclose(got["diff"], diff.numpy(), atol=1e-6) and np.allclose(got["total"], total.numpy(), atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("kind", ["torchscript", "torch_export"])
def test_a_damaged_torch_program_is_a_step_error(tmp_path: Path, kind: str):
    path = tmp_path / "model.pt2"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(StepError) as caught:
        target_format(kind).open_runner(Artifact(path, ["y"], STEP, inputs=[{"name": "x"}]))
    assert str(caught.value).startswith(f"{STEP}: torch cannot load model.pt2: ") and "\n" not in str(caught.value)


# ---- state_dict files (format = "pytorch") ------------------------------------------------------

TWO_INPUTS_FACTORY = '''
import torch


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))

    def forward(self, a, b):
        h = self.net(a)
        return h - b, h.sum(-1)


def build():
    return TwoInputs().eval()
'''


def _state_dict_artifact(tmp_path: Path, state: dict) -> Artifact:
    """A torch factory source (the same network as _TwoInputs) and a state_dict saved beside it."""
    (tmp_path / "twoinputs.py").write_text(TWO_INPUTS_FACTORY)
    torch.save(state, tmp_path / "model.pt")
    source = {"kind": "torch", "factory": "twoinputs:build", "weights": None, "allow_pickle": False}
    return Artifact(tmp_path / "model.pt", ["diff", "total"], STEP, source, [tmp_path / "twoinputs.py"],
                    [{"name": "a", "dtype": "float32"}, {"name": "b", "dtype": "float32"}], tmp_path)


def test_the_pytorch_runner_runs_the_source_architecture_with_the_files_fp16_weights(tmp_path: Path):
    module = _TwoInputs().eval()
    half = {key: value.half() for key, value in module.state_dict().items()}
    a = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((2, 2)).astype(np.float32)
    got = target_format("pytorch").open_runner(_state_dict_artifact(tmp_path, half))({"b": b, "a": a})
    module.load_state_dict({key: value.float() for key, value in half.items()})  # the weights as a CPU user widens them
    with torch.no_grad():
        diff, total = module(torch.from_numpy(a), torch.from_numpy(b))
    assert list(got) == ["diff", "total"] and got["diff"].dtype == np.float32  # widened to the model's dtype, not run in fp16
    assert np.array_equal(got["diff"], diff.numpy()) and np.array_equal(got["total"], total.numpy())


def test_the_pytorch_runner_refuses_a_state_dict_missing_a_key(tmp_path: Path):
    state = _TwoInputs().state_dict()
    del state["net.2.bias"]
    with pytest.raises(StepError) as caught:
        target_format("pytorch").open_runner(_state_dict_artifact(tmp_path, state))
    assert str(caught.value) == f"{STEP}: the state_dict in model.pt does not fit the source architecture: missing ['net.2.bias'] (1 keys)"


@pytest.mark.parametrize("precision, stored", [("fp16", torch.float32), ("fp32", torch.float16), ("bf16", torch.float16)])
def test_a_weights_file_at_another_precision_than_the_targets_is_refused(tmp_path: Path, precision: str, stored):
    """An fp16 target holding fp32 weights (or the reverse) would pass under the wrong thresholds."""
    import dataclasses

    from kiln.native import safetensors

    state = {key: value.to(stored) for key, value in _TwoInputs().state_dict().items()}
    artifact = dataclasses.replace(_state_dict_artifact(tmp_path, state), precision=precision)
    want = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[precision]
    with pytest.raises(StepError) as caught:
        target_format("pytorch").open_runner(artifact)
    assert str(caught.value) == f"{STEP}: model.pt stores 'net.0.bias' as {str(stored)[6:]}; a {precision} target stores the source's float32 weights as {want}"
    safetensors.save_file({key: value.numpy() for key, value in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(StepError, match=f"model.safetensors stores 'net.0.bias' as {str(stored)[6:]}; a {precision} target"):
        target_format("safetensors").open_runner(dataclasses.replace(artifact, path=tmp_path / "model.safetensors"))


def test_a_weights_file_at_the_targets_precision_is_accepted(tmp_path: Path):
    import dataclasses

    half = {key: value.half() for key, value in _TwoInputs().state_dict().items()}
    run = target_format("pytorch").open_runner(dataclasses.replace(_state_dict_artifact(tmp_path, half), precision="fp16"))
    assert set(run({"a": np.zeros((1, 3), np.float32), "b": np.zeros((1, 2), np.float32)})) == {"diff", "total"}


# ---- TensorRT ---------------------------------------------------------------------------------


@pytest.mark.skipif(unavailable_reason(0) is None, reason="this machine can run TensorRT engines")
def test_tensorrt_without_a_usable_gpu_is_unavailable_not_an_error(tmp_path: Path):
    trt = target_format("tensorrt")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0" * 16)
    with pytest.raises(RuntimeUnavailable) as caught:
        trt.open_runner(Artifact(engine, ["y"], STEP))
    missing = unavailable_reason(0)
    assert str(caught.value) == f"TensorRT engines run on an NVIDIA GPU: {missing}"
    assert trt.unavailable_reason(trt.Target(format="tensorrt")) == f'hardware = "cuda" needs an NVIDIA GPU with TensorRT: {missing}'
    assert "tensorrt" in missing or "GPU" in missing or "CUDA" in missing  # it says what is missing


def test_formats_without_special_hardware_are_always_available():
    for fmt in FORMATS:
        if fmt.format != "tensorrt":
            assert fmt.unavailable_reason(fmt.Target(format=fmt.format)) is None
