"""Where the Ray executor puts a step's inputs in a worker's scratch workspace (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

from kiln.execute.ray_executor import placement


def test_a_source_folder_outside_the_workspace_stays_one_folder_with_its_names(tmp_path: Path):
    # a Hugging Face folder inside site-packages: its loader reads siblings of files[0] (weights, tokenizer)
    root, folder = tmp_path / "ws", tmp_path / "site-packages" / "pkg" / "model"
    files = [folder / "config.json", folder / "model.safetensors", folder / "1_Pooling" / "config.json"]
    placed = [placement(p, root, "source", files) for p in files]
    assert placed == [".kiln-ray/outside/source/config.json", ".kiln-ray/outside/source/model.safetensors",
                      ".kiln-ray/outside/source/1_Pooling/config.json"]


def test_files_inside_the_workspace_keep_their_workspace_paths(tmp_path: Path):
    root = tmp_path / "ws"
    data, outside = root / "manifests" / "data" / "x.npz", tmp_path / "elsewhere" / "m.onnx"
    assert placement(data, root, "data", [data]) == "manifests/data/x.npz"
    assert placement(outside, root, "model", [data, outside]) == ".kiln-ray/outside/model/m.onnx"
