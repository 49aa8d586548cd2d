"""convert_tflite_torch on the example convnet (manifests/models/tinycnn.py): litert-torch in its own
tool environment gives a .tflite that runs in LiteRT under the manifest's names, NCHW, matching torch
(fp32 to 1e-5, also at a batch it was not converted with), fp16 and int8 dynamic range really
quantized and close; two conversions are byte-identical; a model litert-torch cannot convert is one
line. The conversions need the "litert_torch" tool environment (created in the user's cache on first
use: a registry install, about a minute) and take ~9 s each: slow."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from kiln.build_rules.convert_tflite_torch import ConvertTfliteTorch, ConvertTfliteTorchParams
from kiln.errors import StepError
from kiln.rules import RunContext

INPUTS = [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
OUTPUTS = [{"name": "logits", "shape": ["batch", 10]}]
SOURCE = {"kind": "torch", "factory": "models.tinycnn:build"}

NOT_EXPORTABLE = '''
import torch

class DataDependent(torch.nn.Module):
    def forward(self, image):
        if image.sum() > 0:  # control flow on values: torch.export cannot capture it
            return image.mean((2, 3)).repeat(1, 4)[:, :10]
        return image.amax((2, 3)).repeat(1, 4)[:, :10]

def build():
    return DataDependent()
'''


BATCH_BAKED_IN = '''
import torch

class Baked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 32 * 32, 10)

    def forward(self, image):
        return self.fc(image.reshape(2, -1))  # exported at batch 2, this reshape keeps the 2

def build():
    torch.manual_seed(0)
    return Baked()
'''


def workspace(root: Path) -> Path:
    (root / "models").mkdir(parents=True)
    shutil.copy(REPO / "manifests" / "models" / "tinycnn.py", root / "models" / "tinycnn.py")
    (root / "models" / "broken.py").write_text(NOT_EXPORTABLE)
    (root / "models" / "baked.py").write_text(BATCH_BAKED_IN)
    return root


def convert(root: Path, out: Path, precision: str = "fp32", factory: str = "tinycnn") -> dict:
    params = ConvertTfliteTorchParams(source=SOURCE | {"factory": f"models.{factory}:build"}, inputs=INPUTS, outputs=OUTPUTS,
                                      precision=precision, quantization="dynamic" if precision == "int8" else None)
    return ConvertTfliteTorch().run({"source": [root / "models" / f"{factory}.py"]}, {"model": out}, params, RunContext(root, f"tflite_{precision}"))


def run_litert(path: Path, images: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path), num_threads=1).get_signature_runner("serving_default")
    return runner(image=images)["logits"]


def tinycnn():
    """The example factory's module (manifests/models/tinycnn.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tinycnn_example", REPO / "manifests" / "models" / "tinycnn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_logits(images: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return tinycnn().build()(torch.from_numpy(images)).numpy()


def images(count: int) -> np.ndarray:
    return tinycnn().validation_images(count)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    pytest.importorskip("ai_edge_litert")
    root = workspace(tmp_path_factory.mktemp("ws"))
    return root, {p: (root / f"{p}.tflite", convert(root, root / f"{p}.tflite", p)) for p in ("fp32", "fp16", "int8")}


@pytest.mark.slow
def test_fp32_runs_in_litert_under_the_manifest_names_and_matches_torch(converted):
    path, facts = converted[1]["fp32"]
    for batch in (2, 8):  # converted at batch 2; LiteRT resizes to the validation batch
        x = images(batch)
        got = run_litert(path, x)
        assert got.shape == (batch, 10)
        assert np.abs(got - torch_logits(x)).max() <= 1e-5
    assert facts["inputs"] == {"image": {"dtype": "float32", "shape": [2, 3, 32, 32]}}  # NCHW, PyTorch's layout
    assert facts["outputs"] == {"logits": {"dtype": "float32", "shape": [2, 10]}}
    assert "NCHW" in facts["layout"] and facts["converter"] == "litert-torch" and facts["precision"] == "fp32"
    assert "float16" not in facts["tensor_dtypes"] and "quantized" not in facts["tensor_dtypes"]


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "held", "tolerance"), [("fp16", "float16", 1e-3), ("int8", "quantized", 2e-2)])
def test_fp16_and_int8_hold_their_precision_and_stay_close(converted, precision: str, held: str, tolerance: float):
    path, facts = converted[1][precision]
    fp32 = converted[1]["fp32"][0]
    assert facts["tensor_dtypes"].get(held) and facts["precision"] == precision
    assert path.stat().st_size < fp32.stat().st_size
    x = images(8)
    diff = np.abs(run_litert(path, x) - torch_logits(x)).max()
    assert 0 < diff <= tolerance  # not the fp32 model under another name


@pytest.mark.slow
def test_two_conversions_are_byte_identical(converted, tmp_path: Path):
    root, done = converted
    convert(root, tmp_path / "again.tflite", "int8")
    assert hashlib.sha256((tmp_path / "again.tflite").read_bytes()).digest() == hashlib.sha256(done["int8"][0].read_bytes()).digest()
    convert(root, tmp_path / "again32.tflite", "fp32")
    assert (tmp_path / "again32.tflite").read_bytes() == done["fp32"][0].read_bytes()


@pytest.mark.slow
def test_a_model_litert_torch_cannot_convert_is_one_line_and_writes_nothing(converted, tmp_path: Path):
    root = converted[0]
    with pytest.raises(StepError) as raised:
        convert(root, tmp_path / "model.tflite", factory="broken")
    assert str(raised.value).startswith("tflite_fp32: litert-torch conversion failed: ") and "\n" not in str(raised.value)
    assert not (tmp_path / "model.tflite").exists()


@pytest.mark.slow
def test_a_file_that_runs_only_at_the_example_batch_fails_saying_so(converted, tmp_path: Path):
    with pytest.raises(StepError, match=r"^tflite_fp32: model.tflite: the converted model runs only at the example's batch of 2: .* cannot resize this graph to batch 3"):
        convert(converted[0], tmp_path / "model.tflite", factory="baked")
    assert not (tmp_path / "model.tflite").exists()


def test_int8_without_dynamic_quantization_is_refused_before_anything_runs(tmp_path: Path):
    params = ConvertTfliteTorchParams(source=SOURCE, inputs=INPUTS, outputs=OUTPUTS, precision="int8")
    with pytest.raises(StepError, match="int8 takes quantization = \"dynamic\""):
        ConvertTfliteTorch().run({"source": [tmp_path / "x.py"]}, {"model": tmp_path / "m.tflite"}, params, RunContext(tmp_path, "s"))


def test_the_step_key_holds_the_tool_environment_identity():
    from kiln.base.toolenv import tool_env
    from kiln.base.tools import tool_versions

    tools = tool_versions(ConvertTfliteTorch.tools_for({}))
    assert tools["toolenv:litert_torch"] == tool_env("litert_torch").version() and "torch" in tools
