"""write_pytorch and the pytorch format's validation: the published model.pt is the source's
state_dict as torch.save writes it (fp32: the same bytes as torch.save(model.state_dict())), cast
exactly at fp16/bf16, loads with torch.load(weights_only=True) into the source architecture, keeps
tied weights as one storage, and is byte-identical across workspaces; a file that does not fit the
architecture fails validation naming the key. A Hugging Face source (tiny GPT-2, tied head)
publishes the state_dict file alone."""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, Workspace, example_workspace, new_workspace
from kiln.errors import StepError
from kiln.formats.pytorch import Pytorch
from kiln.runtime.runners import Artifact

# Two layers sharing one weight (as a language model ties its embedding and its head), and a
# batch norm, whose num_batches_tracked buffer is an int64 that must stay one.
TIEDNET = '''
import torch


class TiedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encode = torch.nn.Linear(6, 6)
        self.decode = torch.nn.Linear(6, 6)
        self.decode.weight = self.encode.weight
        self.norm = torch.nn.BatchNorm1d(6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, features):
        return self.head(self.norm(self.decode(torch.tanh(self.encode(features)))))


def build():
    torch.manual_seed(0)
    return TiedNet().eval()
'''

MANIFEST = '''
[model]
name = "tied"

[source]
kind = "torch"
factory = "tiednet:build"

[[inputs]]
name = "features"
dtype = "float32"
shape = ["batch", 6]

[[outputs]]
name = "scores"
shape = ["batch", 3]

[targets.pytorch_fp32]
format = "pytorch"

[targets.pytorch_fp16]
format = "pytorch"
precision = "fp16"

[targets.pytorch_bf16]
format = "pytorch"
precision = "bf16"

[validation]
data = "data/tied.npz"
batch_size = 16
'''

PRECISIONS = {"pytorch_fp32": torch.float32, "pytorch_fp16": torch.float16, "pytorch_bf16": torch.bfloat16}
SOURCE = {"kind": "torch", "factory": "tiednet:build", "weights": None, "allow_pickle": False}
INPUTS = [{"name": "features", "dtype": "float32", "shape": ["batch", 6]}]
STEP = "tied/pytorch_fp32/validate"


def tied_workspace(root: Path) -> Workspace:
    import numpy as np

    ws = new_workspace(root, {"tied": MANIFEST})
    (ws.root / "tiednet.py").write_text(TIEDNET)
    np.savez(ws.root / "manifests/data/tied.npz", features=np.random.default_rng(1).standard_normal((40, 6)).astype(np.float32))
    return ws


def source_model() -> torch.nn.Module:
    namespace: dict = {}
    exec(TIEDNET, namespace)
    return namespace["build"]()


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Workspace:
    ws = tied_workspace(tmp_path_factory.mktemp("pytorch") / "ws")
    ws.doit("build")
    return ws


def test_fp32_is_the_source_state_dict_as_torch_save_writes_it(built: Workspace):
    path = built.root / "build/tied/pytorch_fp32/model.pt"
    expected = source_model().state_dict()
    written = load(path)
    assert list(written) == list(expected) and all(torch.equal(written[k], expected[k]) and written[k].dtype == expected[k].dtype for k in expected)
    buffer = io.BytesIO()
    torch.save(expected, buffer)
    assert path.read_bytes() == buffer.getvalue()
    report = built.report("tied")
    artifacts = {a["target"]: a for a in report["artifacts"]}
    assert report["ok"] and set(artifacts) == set(PRECISIONS)
    assert artifacts["pytorch_fp32"]["path"] == "build/tied/pytorch_fp32/model.pt"
    assert artifacts["pytorch_fp32"]["metrics"]["scores"]["max_abs_diff"] == 0.0


@pytest.mark.parametrize("target", ["pytorch_fp16", "pytorch_bf16"])
def test_half_precisions_hold_the_casts_and_validate_within_tolerance(built: Workspace, target: str):
    dtype = PRECISIONS[target]
    written = load(built.root / f"build/tied/{target}/model.pt")
    for key, value in source_model().state_dict().items():
        if value.is_floating_point():
            assert written[key].dtype == dtype and torch.equal(written[key], value.to(dtype)), key  # the exact round-to-nearest cast
        else:
            assert written[key].dtype == value.dtype and torch.equal(written[key], value), key  # num_batches_tracked stays int64
    scores = {a["target"]: a for a in built.report("tied")["artifacts"]}[target]["metrics"]["scores"]
    assert 0 < scores["max_abs_diff"] < 5e-2 and scores["min_cosine"] > 0.999


@pytest.mark.parametrize("target", list(PRECISIONS))
def test_tied_weights_share_one_storage_stored_once(built: Workspace, target: str):
    path = built.root / f"build/tied/{target}/model.pt"
    written = load(path)
    assert written["encode.weight"].untyped_storage().data_ptr() == written["decode.weight"].untyped_storage().data_ptr()
    records = [n for n in zipfile.ZipFile(path).namelist() if re.fullmatch(r"archive/data/\d+", n)]
    assert len(records) == len(written) - 1  # 11 tensors, 10 storages: the tied weight's once
    model = source_model()
    model.load_state_dict(written, strict=True)  # what a user does, strictly
    assert model.decode.weight is model.encode.weight


def test_the_published_folder_holds_the_state_dict_and_its_records(built: Workspace):
    names = {p.name for p in (built.root / "build/tied/pytorch_fp16").iterdir()}
    assert names == {"model.pt", "validation.json", "provenance.intoto.json"}


def test_two_workspaces_write_identical_bytes(built: Workspace, tmp_path: Path):
    second = tied_workspace(tmp_path / "second")
    second.doit("build")
    for target in PRECISIONS:
        first_bytes, second_bytes = (ws.root / f"build/tied/{target}/model.pt" for ws in (built, second))
        assert hashlib.sha256(first_bytes.read_bytes()).digest() == hashlib.sha256(second_bytes.read_bytes()).digest(), target


# ---- validation: the file must fit the source architecture --------------------------------------


def open_runner(root: Path, path: Path):
    return Pytorch().open_runner(Artifact(path, ["scores"], STEP, SOURCE, [root / "tiednet.py"], INPUTS, root))


def test_the_runner_gives_the_source_outputs_from_the_files_weights(tmp_path: Path):
    (tmp_path / "tiednet.py").write_text(TIEDNET)
    state = source_model().state_dict()
    state["head.bias"] = state["head.bias"] + 1.0  # so the outputs show the file's weights were used, not the source's
    torch.save(state, tmp_path / "model.pt")
    features = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    got = open_runner(tmp_path, tmp_path / "model.pt")({"features": features.numpy()})
    with torch.no_grad():
        expected = source_model()(features) + 1.0
    assert torch.allclose(torch.from_numpy(got["scores"]), expected, atol=1e-6)


def _without(key):
    def change(state):
        del state[key]
        return state
    return change


def _with(key, value):
    def change(state):
        state[key] = value
        return state
    return change


MISFITS = [
    (_without("norm.running_var"), "does not fit the source architecture: missing ['norm.running_var'] (1 keys)"),
    (_without("decode.weight"), "does not fit the source architecture: missing ['decode.weight'] (1 keys)"),
    (_with("extra.weight", torch.zeros(2)), "does not fit the source architecture: unexpected ['extra.weight'] (1 keys)"),
    (_with("head.weight", torch.zeros(3, 5)), "does not fit the source architecture: 'head.weight' has shape [3, 5]; the source architecture's is [3, 6]"),
    (_with("norm.num_batches_tracked", torch.tensor(0.0)), "does not fit the source architecture: 'norm.num_batches_tracked' is torch.float32; the source architecture's is torch.int64"),
    (lambda state: list(state.values()), "model.pt holds a list, not a state_dict (a dict of tensors)"),
    (lambda state: state | {"epoch": 3}, "model.pt is not a state_dict: its entry 'epoch' is a int, not a tensor"),
]


@pytest.mark.parametrize("change, problem", MISFITS, ids=["missing", "missing-tied", "unexpected", "shape", "kind", "list", "not-tensor"])
def test_a_file_that_does_not_fit_fails_validation_naming_the_key(tmp_path: Path, change, problem: str):
    (tmp_path / "tiednet.py").write_text(TIEDNET)
    torch.save(change(source_model().state_dict()), tmp_path / "model.pt")
    with pytest.raises(StepError) as caught:
        open_runner(tmp_path, tmp_path / "model.pt")
    message = str(caught.value)
    assert message.startswith(f"{STEP}: ") and message.endswith(problem) and "\n" not in message


def test_a_file_torch_load_refuses_is_a_step_error(tmp_path: Path):
    (tmp_path / "tiednet.py").write_text(TIEDNET)
    (tmp_path / "model.pt").write_bytes(b"not a zip archive")
    with pytest.raises(StepError) as caught:
        open_runner(tmp_path, tmp_path / "model.pt")
    message = str(caught.value)
    assert message.startswith(f"{STEP}: torch.load(weights_only=True) cannot load model.pt: ") and "\n" not in message


# ---- a Hugging Face source --------------------------------------------------------------------


def test_a_hugging_face_source_publishes_the_state_dict_alone_tied_head_stored_once(tmp_path: Path):
    from transformers import AutoConfig, GPT2LMHeadModel

    text = (REPO / "manifests/tiny_gpt2.toml").read_text()
    head, _, rest = text.partition("[targets.onnx_fp32]")
    manifest = head + '[targets.weights]\nformat = "pytorch"\nprecision = "fp16"\n\n' + rest[rest.index("[validation]"):]
    ws = example_workspace(tmp_path / "ws", "tiny_gpt2")
    ws.manifest("tiny_gpt2").write_text(manifest)
    ws.doit("build")
    (artifact,) = ws.report("tiny_gpt2")["artifacts"]
    assert artifact["passed"] and artifact["metrics"]["logits"]["min_cosine"] > 0.999
    folder = ws.root / "build/tiny_gpt2/weights"
    assert {p.name for p in folder.iterdir()} == {"model.pt", "validation.json", "provenance.intoto.json"}
    written = load(folder / "model.pt")
    assert written["lm_head.weight"].untyped_storage().data_ptr() == written["transformer.wte.weight"].untyped_storage().data_ptr()
    source = ws.root / "manifests/models/tiny-gpt2"
    model = GPT2LMHeadModel(AutoConfig.from_pretrained(source, local_files_only=True))
    model.load_state_dict(written, strict=True)  # the documented use: a plain state_dict
    original = GPT2LMHeadModel.from_pretrained(source, local_files_only=True)
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight, original.transformer.h[0].mlp.c_fc.weight.half().float())
