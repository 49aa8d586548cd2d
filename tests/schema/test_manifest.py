from __future__ import annotations

from pathlib import Path

import pytest

from kiln.errors import ManifestError
from kiln.schema.manifest import all_manifests, find_manifest, read_manifest


def test_toml_syntax_error_names_file_and_line(tmp_path: Path):
    path = tmp_path / "m.toml"
    path.write_text('[model]\nname = "x"\nname = "y"\n')
    with pytest.raises(ManifestError, match=r"m\.toml: TOML syntax error: Cannot overwrite a value \(at line 3"):
        read_manifest(path)


def test_non_utf8_manifest(tmp_path: Path):
    path = tmp_path / "m.toml"
    path.write_bytes(b'[model]\nname = "\xff"\n')
    with pytest.raises(ManifestError, match="not UTF-8 text"):
        read_manifest(path)


def test_bare_name_is_looked_up_in_manifests(tmp_path: Path):
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "a.toml").write_text("")
    expected = (tmp_path / "manifests" / "a.toml").resolve()
    assert find_manifest("a.toml", tmp_path) == expected
    assert find_manifest("a", tmp_path) == expected
    assert find_manifest("manifests/a.toml", tmp_path) == expected
    assert all_manifests(tmp_path) == [expected]
    with pytest.raises(ManifestError, match="manifest not found"):
        find_manifest("b.toml", tmp_path)
