"""kiln.base.paths: paths made workspace-relative (as written, or with links followed) and the state folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kiln.base.paths import relative, state_dir, workspace_path


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / "build" / "m").mkdir(parents=True)
    (root / "build" / "m" / "model.onnx").write_bytes(b"x")
    return root


def test_a_path_inside_is_slash_separated_and_relative(ws: Path):
    assert workspace_path(ws / "build" / "m" / "model.onnx", ws) == "build/m/model.onnx"
    assert workspace_path(str(ws / "a.txt"), str(ws) + os.sep) == "a.txt"  # a root given with a trailing separator
    assert workspace_path(ws / "not" / "there.json", ws) == "not/there.json"  # need not exist


def test_a_path_outside_is_none(ws: Path, tmp_path: Path):
    assert workspace_path(tmp_path / "elsewhere.npz", ws) is None
    assert workspace_path(tmp_path / "ws2" / "a.txt", ws) is None  # a sibling sharing the root's name as a prefix
    assert workspace_path(ws, ws) is None  # the root itself is no file in it


def test_without_following_links_paths_are_compared_as_written(ws: Path):
    assert workspace_path(ws / "build" / ".." / ".." / "secret", ws) == "build/../../secret"
    assert workspace_path(ws / "build" / ".." / ".." / "secret", ws, follow_links=True) is None


def test_following_links_sees_where_a_symlink_points(ws: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.npz").write_bytes(b"d")
    (ws / "data").symlink_to(outside)  # a link inside the workspace to a folder outside it
    assert workspace_path(ws / "data" / "data.npz", ws) == "data/data.npz"
    assert workspace_path(ws / "data" / "data.npz", ws, follow_links=True) is None
    back = outside / "model.onnx"
    back.symlink_to(ws / "build" / "m" / "model.onnx")  # a link outside to a file inside
    assert workspace_path(back, ws) is None
    assert workspace_path(back, ws, follow_links=True) == "build/m/model.onnx"


def test_following_links_resolves_a_linked_root(ws: Path, tmp_path: Path):
    link = tmp_path / "ws_link"
    link.symlink_to(ws)
    assert workspace_path(ws / "build" / "m" / "model.onnx", link, follow_links=True) == "build/m/model.onnx"
    assert workspace_path(link / "build" / "m" / "model.onnx", ws, follow_links=True) == "build/m/model.onnx"
    assert workspace_path(link / "build" / "m" / "model.onnx", ws) is None


def test_relative_is_workspace_relative_or_the_path_as_given(ws: Path, tmp_path: Path):
    assert relative(ws / "build" / "m" / "model.onnx", ws) == "build/m/model.onnx"
    assert relative(tmp_path / "elsewhere.npz", ws) == str(tmp_path / "elsewhere.npz")
    (ws / "m.toml").symlink_to(tmp_path / "real.toml")
    assert relative(ws / "m.toml", ws) == str(ws / "m.toml")  # points outside: shown as the user named it


def test_the_state_folder_is_build_dot_kiln(ws: Path):
    assert state_dir(ws) == ws / "build" / ".kiln"
