"""A manifest named on the command line by its [model] name (kiln.schema.names), as well as by file."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.errors import ManifestError
from kiln.schema.names import manifest_for


def _workspace(root: Path) -> Path:
    (root / "manifests").mkdir(parents=True)
    (root / "manifests" / "bert_tensorrt.toml").write_text('[model]\nname = "bert_trt"\n')
    (root / "manifests" / "other.toml").write_text('[model]\nname = "other"\n')
    (root / "manifests" / "broken.toml").write_text("[model\n")
    return root


def test_model_name_finds_the_manifest_that_declares_it(tmp_path):
    root = _workspace(tmp_path)
    assert manifest_for("bert_trt", root) == root / "manifests" / "bert_tensorrt.toml"
    assert manifest_for("bert_tensorrt", root) == (root / "manifests" / "bert_tensorrt.toml").resolve()  # file names still work


def test_an_unknown_name_lists_the_model_names(tmp_path):
    root = _workspace(tmp_path)
    with pytest.raises(ManifestError) as err:
        manifest_for("bert", root)
    assert "no manifest under manifests/ has [model] name = 'bert' (model names: bert_trt, other)" in str(err.value)
    assert "\n" not in str(err.value)


def test_check_accepts_the_model_name(tmp_path, capsys):
    import shutil

    from conftest import REPO
    from kiln.cli import main

    root = tmp_path / "ws"
    for folder, name in (("models", "tiny_stateful.onnx"), ("data", "tiny_stateful.npz")):
        (root / "manifests" / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "manifests" / folder / name, root / "manifests" / folder / name)
    text = (REPO / "manifests" / "tiny_stateful.toml").read_text().replace('name = "tiny_stateful"', 'name = "stream"', 1)
    (root / "manifests" / "tiny_stateful.toml").write_text(text)
    assert main(["--root", str(root), "check", "stream"]) == 0
    assert "tiny_stateful.toml: ok: model stream," in capsys.readouterr().out
