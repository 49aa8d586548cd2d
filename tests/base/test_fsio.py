"""kiln.base.fsio: files written whole or not at all, and JSON read once per stat.

write_json_atomic (no write when unchanged, no temp left behind, durable and by-line forms),
read_json (cached while the stat is unchanged, sees a replaced file, None for missing or torn
JSON), write_bytes_atomic, and dumps_by_line (valid JSON equal to the data, one key per line).
Artifacts that are folders: replace_artifact (whole; an atomic exchange on Linux, so the destination
is never absent; elsewhere the old one set aside and put back on failure), copy_artifact (atomic,
regular files and empty folders, a symlink refused), remove_artifact, artifact_bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kiln.base import fsio
from kiln.base.fsio import (artifact_bytes, copy_artifact, dumps_by_line, read_json, remove_artifact, replace_artifact, write_bytes_atomic,
                            write_json_atomic)
from kiln.base.hashing import UnsafeFolderEntry
from kiln.base.temps import temp_path

RECORD = {"step": "m/t/validate", "inputs": {"model": ["build/a.onnx"]}, "passed": True, "samples": 40, "metrics": [0.5, 1e-7]}


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_json_atomic_creates_the_folder_and_leaves_no_temp(tmp_path: Path):
    path = tmp_path / "state" / "records" / "r.json"
    assert write_json_atomic(path, RECORD) is True
    assert json.loads(path.read_text()) == RECORD
    assert path.read_text() == json.dumps(RECORD, indent=2, sort_keys=True) + "\n"
    assert _listing(path.parent) == ["r.json"]


def test_unchanged_data_is_not_written_again(tmp_path: Path):
    path = tmp_path / "r.json"
    write_json_atomic(path, RECORD)
    before = os.stat(path)
    assert write_json_atomic(path, json.loads(json.dumps(RECORD))) is False  # equal, not the same object
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert _listing(tmp_path) == ["r.json"]


def test_changed_data_replaces_the_file(tmp_path: Path):
    path = tmp_path / "r.json"
    write_json_atomic(path, RECORD)
    assert read_json(path) == RECORD  # now cached
    assert write_json_atomic(path, RECORD | {"samples": 41}) is True
    assert read_json(path)["samples"] == 41 and json.loads(path.read_text())["samples"] == 41
    assert _listing(tmp_path) == ["r.json"]


def test_a_torn_file_is_rewritten_even_with_the_same_data(tmp_path: Path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(RECORD)[:-5])
    assert write_json_atomic(path, RECORD) is True and json.loads(path.read_text()) == RECORD


def test_a_non_durable_write_is_by_line_json(tmp_path: Path):
    path = tmp_path / "fresh.json"
    assert write_json_atomic(path, RECORD, durable=False) is True
    assert path.read_text() == dumps_by_line(RECORD) and json.loads(path.read_text()) == RECORD
    assert write_json_atomic(path, RECORD, durable=False) is False


def test_read_json_parses_a_file_once_while_its_stat_is_unchanged(tmp_path: Path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(RECORD))
    first = read_json(path)
    assert first == RECORD and read_json(path) is first


def test_read_json_sees_a_file_replaced_by_another_writer(tmp_path: Path):
    path = tmp_path / "r.json"
    path.write_text('{"n": 1}')
    assert read_json(path) == {"n": 1}
    other = tmp_path / "other.json"
    other.write_text('{"n": 2}')  # same size: only the inode tells
    os.replace(other, path)
    assert read_json(path) == {"n": 2}


def test_read_json_is_none_for_missing_torn_or_undecodable_files(tmp_path: Path):
    assert read_json(tmp_path / "missing.json") is None
    torn = tmp_path / "torn.json"
    torn.write_text('{"step": "m/t/val')
    assert read_json(torn) is None
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'{"a": "\xff\xfe"}')
    assert read_json(binary) is None
    assert read_json(tmp_path) is None  # a folder


def test_write_bytes_atomic_writes_and_replaces_whole_files(tmp_path: Path):
    path = tmp_path / "out" / "model.bin"
    write_bytes_atomic(path, b"\x00first")
    assert path.read_bytes() == b"\x00first"
    write_bytes_atomic(path, b"second, longer")
    assert path.read_bytes() == b"second, longer"
    write_bytes_atomic(path, b"")
    assert path.read_bytes() == b"" and _listing(path.parent) == ["model.bin"]


def test_dumps_by_line_is_json_equal_to_the_data():
    data = {
        "steps": [{"step": "b", "status": "ran"}, {"step": "a", "status": "cached", "nested": {"z": 1, "a": [1, 2]}}],
        "empty": [], "none": None, "text": "line\nbreak \"quoted\" caf\u00e9 \u2713", "number": 1.5e-9,
        "flag": False, "table": {"b": 2, "a": {"c": []}},
    }
    text = dumps_by_line(data)
    assert json.loads(text) == data
    assert text.endswith("}\n") and text == dumps_by_line(dict(reversed(list(data.items()))))  # key order does not matter
    lines = text.splitlines()
    assert lines[1].startswith(' "empty": []')  # sorted keys, one per line
    assert '  {"status": "ran", "step": "b"},' in lines  # one list item per line, keys sorted
    assert json.loads(dumps_by_line({})) == {}


# ---- artifacts that are folders: replace_artifact, copy_artifact, remove_artifact, artifact_bytes ----

def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _make(folder: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def test_replace_artifact_swaps_a_folder_whole_and_leaves_nothing_aside(tmp_path: Path):
    dest = _make(tmp_path / "model.mlpackage", {"Manifest.json": b"old", "Data/stale.bin": b"gone"})
    new = _make(temp_path(dest), {"Manifest.json": b"new", "Data/weight.bin": b"w"})
    replace_artifact(new, dest)
    assert _tree(dest) == {"Data/weight.bin": b"w", "Manifest.json": b"new"}  # the old folder's files did not stay
    assert _listing(tmp_path) == ["model.mlpackage"]


@pytest.mark.parametrize(("old_is_folder", "new_is_folder"), [(True, False), (False, True), (False, False)])
def test_replace_artifact_replaces_a_file_by_a_folder_and_back(tmp_path: Path, old_is_folder: bool, new_is_folder: bool):
    dest = tmp_path / "model"
    _make(dest, {"a": b"old"}) if old_is_folder else dest.write_bytes(b"old")
    new = temp_path(dest)
    _make(new, {"b": b"new"}) if new_is_folder else new.write_bytes(b"new")
    replace_artifact(new, dest)
    assert (_tree(dest) == {"b": b"new"}) if new_is_folder else (dest.read_bytes() == b"new")
    assert _listing(tmp_path) == ["model"]


def _libc_has_renameat2() -> bool:
    import ctypes
    import sys

    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "renameat2")


needs_exchange = pytest.mark.skipif(not _libc_has_renameat2(), reason="no renameat2 here (not Linux, or glibc < 2.28)")


@needs_exchange
@pytest.mark.parametrize("old_is_folder", [True, False])
def test_replace_artifact_swaps_a_folder_in_without_the_destination_ever_being_absent(tmp_path: Path, monkeypatch, old_is_folder: bool):
    """One atomic exchange: no rename leaves `dest` missing (a crash then would lose the last good
    build), so os.replace / os.rename are never called."""
    dest = tmp_path / "model.mlpackage"
    _make(dest, {"Manifest.json": b"old"}) if old_is_folder else dest.write_bytes(b"old file")
    new = _make(temp_path(dest), {"Manifest.json": b"new"})

    def no_rename(*args):
        raise AssertionError(f"renamed {args}: the destination would be absent for a moment")

    monkeypatch.setattr(os, "replace", no_rename)
    monkeypatch.setattr(os, "rename", no_rename)
    replace_artifact(new, dest)
    monkeypatch.undo()
    assert _tree(dest) == {"Manifest.json": b"new"} and _listing(tmp_path) == ["model.mlpackage"]


def test_replace_artifact_renames_aside_where_no_exchange_is_possible(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(fsio, "_renameat2", lambda: None)  # another OS, or an old libc
    dest = _make(tmp_path / "model.mlpackage", {"Manifest.json": b"old"})
    replace_artifact(_make(temp_path(dest), {"Manifest.json": b"new"}), dest)
    assert _tree(dest) == {"Manifest.json": b"new"} and _listing(tmp_path) == ["model.mlpackage"]


@needs_exchange
def test_an_exchange_the_filesystem_refuses_falls_back_to_renaming_aside(tmp_path: Path, monkeypatch):
    import ctypes
    import errno

    def refusing(*args):
        ctypes.set_errno(errno.EINVAL)  # what a filesystem without RENAME_EXCHANGE answers
        return -1

    monkeypatch.setattr(fsio, "_renameat2", lambda: refusing)
    dest = _make(tmp_path / "model.mlpackage", {"Manifest.json": b"old"})
    replace_artifact(_make(temp_path(dest), {"Manifest.json": b"new"}), dest)
    assert _tree(dest) == {"Manifest.json": b"new"} and _listing(tmp_path) == ["model.mlpackage"]


def test_replace_artifact_puts_the_old_folder_back_when_the_new_one_cannot_move_in(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(fsio, "_renameat2", lambda: None)  # the rename-aside path
    dest = _make(tmp_path / "model.mlpackage", {"Manifest.json": b"old"})
    new = _make(temp_path(dest), {"Manifest.json": b"new"})
    real, calls = os.replace, []

    def failing_second(source, target):
        calls.append((source, target))
        if len(calls) == 2:
            raise OSError("disk trouble")
        real(source, target)

    monkeypatch.setattr(os, "replace", failing_second)
    with pytest.raises(OSError, match="disk trouble"):
        replace_artifact(new, dest)
    monkeypatch.setattr(os, "replace", real)
    assert _tree(dest) == {"Manifest.json": b"old"}
    assert Path(calls[0][1]).name.endswith(".old.tmp")  # it was set aside under a temp name a later sweep recognises


def test_copy_artifact_copies_a_folders_files_atomically_over_an_existing_folder(tmp_path: Path):
    source = _make(tmp_path / "steps" / "model.mlpackage", {"Manifest.json": b"{}", "Data/com.apple.CoreML/weights/weight.bin": b"w" * 10})
    dest = _make(tmp_path / "build" / "model.mlpackage", {"Manifest.json": b"older", "stale": b"x"})
    copy_artifact(source, dest)
    assert _tree(dest) == _tree(source) and not (dest / "stale").exists()
    assert (dest / "Manifest.json").stat().st_ino != (source / "Manifest.json").stat().st_ino  # a copy, not a link
    assert _listing(dest.parent) == ["model.mlpackage"]
    copy_artifact(source / "Manifest.json", tmp_path / "build" / "copied.json")
    assert (tmp_path / "build" / "copied.json").read_bytes() == b"{}"


def test_copy_artifact_keeps_empty_folders(tmp_path: Path):
    """A Core ML package's Manifest.json may name an empty weights/ folder, a SavedModel loader may
    expect assets/: the published copy has them."""
    source = _make(tmp_path / "steps" / "model.mlpackage", {"Manifest.json": b"{}"})
    (source / "Data" / "com.apple.CoreML" / "weights").mkdir(parents=True)
    (source / "assets").mkdir()
    dest = tmp_path / "build" / "model.mlpackage"
    copy_artifact(source, dest)
    assert (dest / "Data" / "com.apple.CoreML" / "weights").is_dir() and (dest / "assets").is_dir()
    assert list((dest / "assets").iterdir()) == [] and _tree(dest) == {"Manifest.json": b"{}"}
    assert artifact_bytes(dest) == 2  # an empty folder holds no bytes


def test_copy_artifact_refuses_a_folder_with_a_symlink_before_writing_anything(tmp_path: Path):
    source = _make(tmp_path / "src", {"a": b"a"})
    (source / "link").symlink_to(tmp_path / "outside")
    dest = _make(tmp_path / "out" / "model", {"a": b"previous"})
    with pytest.raises(UnsafeFolderEntry, match="link is a symbolic link"):
        copy_artifact(source, dest)
    assert _tree(dest) == {"a": b"previous"} and _listing(dest.parent) == ["model"]


def test_remove_artifact_removes_files_folders_and_links_but_never_what_a_link_points_to(tmp_path: Path):
    folder = _make(tmp_path / "f", {"x/y": b"1"})
    link = tmp_path / "link"
    link.symlink_to(folder, target_is_directory=True)
    remove_artifact(link)
    assert not link.exists() and _tree(folder) == {"x/y": b"1"}
    remove_artifact(folder)
    remove_artifact(tmp_path / "missing")
    file = tmp_path / "file"
    file.write_bytes(b"")
    remove_artifact(file)
    assert _listing(tmp_path) == []


def test_artifact_bytes_is_a_files_size_or_the_sum_of_a_folders_files(tmp_path: Path):
    folder = _make(tmp_path / "f", {"a": b"12345", "b/c": b"123"})
    (folder / "empty").mkdir()
    assert artifact_bytes(folder) == 8 and artifact_bytes(folder / "a") == 5


def test_a_build_killed_between_the_two_renames_loses_nothing(tmp_path: Path):
    """Where no exchange is possible, a process killed after setting the old folder aside and before
    moving the new one in leaves `dest` absent; the next writer's sweep in that folder puts the
    last good build back (it used to delete it)."""
    import subprocess
    import sys

    from kiln.base.temps import sweep_stale_temps

    dest = _make(tmp_path / "model.mlpackage", {"Manifest.json": b"last good build"})
    (dest / "assets").mkdir()
    killed = subprocess.run([sys.executable, "-c", f"""
import os
from pathlib import Path
from kiln.base import fsio
from kiln.base.temps import temp_path
fsio._renameat2 = lambda: None
dest = Path({str(dest)!r})
new = temp_path(dest)
new.mkdir()
(new / "Manifest.json").write_bytes(b"new")
real, calls = os.replace, []
def dying(source, target):
    calls.append(source)
    if len(calls) == 2:
        os._exit(9)
    real(source, target)
os.replace = dying
fsio.replace_artifact(new, dest)
"""], check=False)
    assert killed.returncode == 9 and not dest.exists()  # the crash state
    sweep_stale_temps(tmp_path)
    assert _tree(dest) == {"Manifest.json": b"last good build"} and (dest / "assets").is_dir()
    assert _listing(tmp_path) == ["model.mlpackage"]  # the unfinished new folder was swept away
