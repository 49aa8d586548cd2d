"""kiln.base.hashing: canonical JSON, sha256 of text and files (also while copying), BLAKE3 of files,
and the digest of a folder (its sorted listing of file digests; symlinks and special files refused)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import blake3
import pytest

from kiln.base import hashing
from kiln.base.hashing import (UnsafeFolderEntry, blake3_file, canonical_json, copy_hashing, list_tree, sha256_file, sha256_path,
                               sha256_text, tree_sha256)


def test_canonical_json_is_one_text_per_value_at_every_depth():
    one = {"outer": {"b": [{"y": 1, "x": 2}], "a": None}, "name": "caf\u00e9"}
    other = {"name": "caf\u00e9", "outer": {"a": None, "b": [{"x": 2, "y": 1}]}}
    assert canonical_json(one) == canonical_json(other) == '{"name":"caf\u00e9","outer":{"a":null,"b":[{"x":2,"y":1}]}}'
    assert canonical_json([2, 1]) != canonical_json([1, 2])  # list order is meaning, not layout
    assert canonical_json({"f": 0.1}) == '{"f":0.1}'


def test_sha256_text_hashes_utf8():
    assert sha256_text("caf\u00e9") == hashlib.sha256("caf\u00e9".encode("utf-8")).hexdigest()


@pytest.mark.parametrize("size", [0, 1, hashing.CHUNK, 2 * hashing.CHUNK + 17])
def test_sha256_file_and_copy_hashing_agree_with_hashlib(tmp_path: Path, size: int):
    data = os.urandom(size)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(source) == expected
    dest = tmp_path / "copy.bin"
    assert copy_hashing(source, dest) == expected
    assert dest.read_bytes() == data


def test_copy_hashing_overwrites_an_existing_destination(tmp_path: Path):
    source, dest = tmp_path / "s", tmp_path / "d"
    source.write_bytes(b"short")
    dest.write_bytes(b"a much longer old file")
    copy_hashing(source, dest)
    assert dest.read_bytes() == b"short"


def test_blake3_of_an_empty_file(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert blake3_file(empty) == blake3.blake3(b"").hexdigest() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


def test_blake3_of_a_file_is_blake3_of_its_bytes(tmp_path: Path):
    data = os.urandom(3 * (1 << 16) + 5)
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    assert blake3_file(path) == blake3.blake3(data).hexdigest()


# ---- folders: list_tree, tree_sha256, sha256_path -----------------------------------------------

def _write_tree(folder: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


PACKAGE = {"Manifest.json": b"{}", "Data/com.apple.CoreML/model.mlmodel": b"spec", "Data/com.apple.CoreML/weights/weight.bin": b"\0" * 64}


def test_a_folders_digest_is_sha256_of_its_sorted_listing_of_file_digests(tmp_path: Path):
    folder = _write_tree(tmp_path / "model.mlpackage", PACKAGE)
    listing = "".join(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n" for rel, data in sorted(PACKAGE.items()))
    expected = hashlib.sha256(b"kiln-tree-v1\0" + listing.encode()).hexdigest()
    assert sha256_path(folder) == expected
    assert [rel for rel, _ in list_tree(folder)] == sorted(PACKAGE)
    assert all(Path(path) == folder / rel for rel, path in list_tree(folder))
    assert tree_sha256([]) == hashlib.sha256(b"kiln-tree-v1\0").hexdigest()
    assert sha256_path(folder / "Manifest.json") == sha256_file(folder / "Manifest.json")  # a file is its own sha256


def test_a_folders_digest_ignores_mtimes_creation_order_and_location(tmp_path: Path):
    one = _write_tree(tmp_path / "a" / "model.mlpackage", PACKAGE)
    other = _write_tree(tmp_path / "elsewhere" / "deeper" / "copy", dict(reversed(PACKAGE.items())))
    os.utime(other / "Manifest.json", ns=(1, 1))
    assert sha256_path(one) == sha256_path(other)
    assert tree_sha256(reversed([(rel, sha256_file(path)) for rel, path in list_tree(one)])) == sha256_path(one)


def test_empty_folders_are_entries_of_the_listing_and_count_in_the_digest(tmp_path: Path):
    """A Core ML package whose Manifest.json names an empty weights/ folder is unloadable without it:
    an empty folder is listed as "<path>/" (only the innermost of nested empty ones) with digest "dir"."""
    folder = _write_tree(tmp_path / "model.mlpackage", {"Manifest.json": b"{}"})
    without = sha256_path(folder)
    (folder / "Data" / "com.apple.CoreML" / "weights").mkdir(parents=True)
    (folder / "assets").mkdir()
    assert [(rel, Path(path)) for rel, path in list_tree(folder)] == [
        ("Data/com.apple.CoreML/weights/", folder / "Data/com.apple.CoreML/weights"), ("Manifest.json", folder / "Manifest.json"),
        ("assets/", folder / "assets")]
    listing = f"Data/com.apple.CoreML/weights/\0dir\nManifest.json\0{hashlib.sha256(b'{}').hexdigest()}\nassets/\0dir\n"
    assert sha256_path(folder) == hashlib.sha256(b"kiln-tree-v1\0" + listing.encode()).hexdigest() != without
    (folder / "assets").rmdir()
    assert sha256_path(folder) not in (without, hashlib.sha256(b"kiln-tree-v1\0" + listing.encode()).hexdigest())
    assert list_tree(tmp_path / "model.mlpackage" / "Data" / "com.apple.CoreML" / "weights") == []  # the artifact itself is no entry


def test_a_listing_entry_must_say_plainly_whether_it_is_an_empty_folder():
    with pytest.raises(ValueError, match="empty folder"):
        tree_sha256([("weights/", hashlib.sha256(b"").hexdigest())])
    with pytest.raises(ValueError, match="empty folder"):
        tree_sha256([("weights", "dir")])


def test_a_folders_digest_is_no_files_sha256(tmp_path: Path):
    """Domain separation: an empty folder is not an empty file, and a file holding a folder's
    listing is not that folder."""
    empty_folder, empty_file = tmp_path / "empty", tmp_path / "empty.bin"
    empty_folder.mkdir()
    empty_file.write_bytes(b"")
    assert sha256_path(empty_folder) != sha256_path(empty_file)
    folder = _write_tree(tmp_path / "f", PACKAGE)
    forged = tmp_path / "listing.bin"
    forged.write_bytes("".join(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n" for rel, data in sorted(PACKAGE.items())).encode())
    assert sha256_path(forged) != sha256_path(folder)


def test_sha256_path_follows_a_link_to_a_folder_as_the_digest_cache_does(tmp_path: Path):
    from kiln.base.digests import DigestCache

    folder = _write_tree(tmp_path / "model.mlpackage", PACKAGE)
    link = tmp_path / "linked.mlpackage"
    link.symlink_to(folder, target_is_directory=True)
    assert sha256_path(link) == sha256_path(folder) == DigestCache(tmp_path / "d.sqlite").digest(link)


@pytest.mark.parametrize("change", ["edit", "rename", "add", "remove", "move into a subfolder"])
def test_every_change_of_a_files_bytes_or_place_changes_the_folders_digest(tmp_path: Path, change: str):
    folder = _write_tree(tmp_path / "f", PACKAGE)
    before = sha256_path(folder)
    manifest = folder / "Manifest.json"
    if change == "edit":
        manifest.write_bytes(b"{ }")
    elif change == "rename":
        manifest.rename(folder / "manifest.json")
    elif change == "add":
        (folder / "extra").write_bytes(b"")
    elif change == "remove":
        manifest.unlink()
    else:
        (folder / "Data" / "Manifest.json").write_bytes(manifest.read_bytes())
        manifest.unlink()
    assert sha256_path(folder) != before


def test_a_symlink_in_a_folder_is_refused_naming_it(tmp_path: Path):
    folder = _write_tree(tmp_path / "f", PACKAGE)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x")
    (folder / "Data" / "link.bin").symlink_to(outside)
    with pytest.raises(UnsafeFolderEntry) as err:
        list_tree(folder)
    assert err.value.relpath == "Data/link.bin" and err.value.kind == f"symbolic link (to {outside})"
    assert str(err.value) == f"{folder}/Data/link.bin is a symbolic link (to {outside}); a folder artifact may hold only regular files and folders"
    assert isinstance(err.value, OSError)
    (folder / "Data" / "link.bin").unlink()
    (folder / "Data" / "linked").symlink_to(tmp_path, target_is_directory=True)  # a folder link: not followed either
    with pytest.raises(UnsafeFolderEntry, match="Data/linked is a symbolic link"):
        sha256_path(folder)


def test_a_fifo_in_a_folder_is_refused(tmp_path: Path):
    folder = _write_tree(tmp_path / "f", PACKAGE)
    os.mkfifo(folder / "pipe")
    with pytest.raises(UnsafeFolderEntry, match="pipe is a fifo"):
        list_tree(folder)
