from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kiln.base import digests as keys
from kiln.base.digests import DigestCache
from kiln.base.hashing import canonical_json, sha256_file
from kiln.base.tools import tool_versions
from kiln.state.uptodate import step_key


def test_canonical_json_ignores_key_order():
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1}) == '{"a":[1,2],"b":1}'
    assert step_key({"x": 1, "y": 2}) == step_key({"y": 2, "x": 1})


def test_tool_versions_include_kiln_and_report_missing_tools():
    versions = tool_versions(("numpy", "no-such-dist-xyz"))
    assert versions["kiln"] and versions["numpy"][0].isdigit() and versions["no-such-dist-xyz"] == "not installed"


def _count_hashes(monkeypatch) -> dict[str, int]:
    calls = {"sha256": 0, "blake3": 0}
    for name in calls:
        real = getattr(keys, f"{name}_file")
        monkeypatch.setattr(keys, f"{name}_file", lambda p, real=real, name=name: calls.__setitem__(name, calls[name] + 1) or real(p))
    return calls


def test_digest_cache_hashes_a_file_once_per_stat(tmp_path: Path, monkeypatch):
    calls = _count_hashes(monkeypatch)
    data = tmp_path / "w.bin"
    data.write_bytes(os.urandom(1 << 16))
    cache = DigestCache(tmp_path / "state" / "d.sqlite")
    first = cache.digest(data)
    assert first == sha256_file(data) and cache.digest(data) == first and calls == {"sha256": 1, "blake3": 1}

    os.utime(data, ns=(time.time_ns(), time.time_ns() + 10**9))  # touch: same bytes, new stat
    assert cache.digest(data) == first and calls == {"sha256": 1, "blake3": 2}  # re-checked by BLAKE3 only
    assert DigestCache(tmp_path / "state" / "d.sqlite").digest(data) == first and calls["blake3"] == 2  # refreshed entry persists

    data.write_bytes(b"other bytes")
    assert cache.digest(data) == sha256_file(data) != first


def test_digest_cache_sees_new_bytes_of_the_same_size_and_stamp(tmp_path: Path):
    data = tmp_path / "w.bin"
    data.write_bytes(b"a" * 4096)
    cache = DigestCache(tmp_path / "d.sqlite")
    first = cache.digest(data)
    st = data.stat()
    data.write_bytes(b"b" * 4096)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only ctime tells
    assert cache.digest(data) == sha256_file(data) != first
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert cache.digest(empty) == sha256_file(empty)


def test_remember_keeps_the_quick_check_of_the_same_bytes(tmp_path: Path, monkeypatch):
    data = tmp_path / "w.bin"
    data.write_bytes(os.urandom(1 << 16))
    cache = DigestCache(tmp_path / "d.sqlite")
    value = cache.digest(data)
    os.link(data, tmp_path / "link")  # a hard link changes ctime, as the cache's store does
    calls = _count_hashes(monkeypatch)
    cache.remember(data, value)
    assert cache.digest(data) == value and calls == {"sha256": 0, "blake3": 0}


def test_a_process_forked_after_hashing_can_still_hash(tmp_path: Path):
    """doit -n 2 forks its workers after the parent has checked (and hashed) files: BLAKE3's thread
    pool does not survive a fork, and a worker that used it would hang."""
    import multiprocessing

    data = tmp_path / "w.bin"
    data.write_bytes(os.urandom(64 << 20))  # large enough to be hashed on several threads
    expected = keys.blake3_file(data)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(keys.blake3_file, (data,)).get(timeout=60) == expected


@pytest.mark.parametrize("trial", range(5))
def test_digest_cache_is_shared_by_threads(tmp_path: Path, trial: int):
    """doit -n 2 -P thread runs steps in threads that share one cache object (sqlite3 connections
    must not cross threads)."""
    from conftest import run_in_threads

    files = []
    for i in range(4):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(bytes([i]) * 1000)
    cache = DigestCache(tmp_path / "digests.sqlite")
    jobs = {f.name: (lambda f=f: cache.digest(f)) for f in files}
    results = run_in_threads(jobs, copies=3)  # twelve threads open a new database at once
    assert len(results) == 12
    assert all(value == sha256_file(tmp_path / name) for name, value in results)


def test_a_folders_digest_goes_through_each_files_entry_and_reads_nothing_when_unchanged(tmp_path: Path, monkeypatch):
    from kiln.base.hashing import sha256_path

    folder = tmp_path / "model.mlpackage"
    (folder / "Data").mkdir(parents=True)
    (folder / "Manifest.json").write_bytes(b"{}")
    (folder / "Data" / "weight.bin").write_bytes(os.urandom(1 << 12))
    calls = _count_hashes(monkeypatch)
    cache = DigestCache(tmp_path / "state" / "d.sqlite")
    first = cache.digest(folder)
    assert first == sha256_path(folder) and calls == {"sha256": 2, "blake3": 2}  # each file hashed once
    assert cache.digest(folder) == first and calls == {"sha256": 2, "blake3": 2}  # nothing read again
    assert cache.listing(folder) == [["Data/weight.bin", sha256_file(folder / "Data" / "weight.bin"), 1 << 12],
                                     ["Manifest.json", sha256_file(folder / "Manifest.json"), 2]]
    (folder / "Manifest.json").write_bytes(b"{\"v\": 2}")
    assert cache.digest(folder) == sha256_path(folder) != first and calls["sha256"] == 3  # only the edited file is read


def test_remember_listing_keeps_a_folders_files_from_being_read_again(tmp_path: Path, monkeypatch):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"a" * 100)
    listing = keys.listing(tmp_path, folder)
    os.link(folder / "a.bin", tmp_path / "linked")  # as the step cache does: the file's ctime changes
    keys.remember_listing(tmp_path, folder, listing)
    calls = _count_hashes(monkeypatch)
    assert keys.listing(tmp_path, folder) == listing and calls == {"sha256": 0, "blake3": 0}


def test_a_folders_listing_holds_its_empty_folders_and_its_digest_counts_them(tmp_path: Path, monkeypatch):
    """An empty folder (a Core ML weights/ folder its Manifest.json names) is an entry of the record's
    listing, [path + "/", "dir", 0], so removing it is seen; remember_listing skips it."""
    from kiln.base.hashing import sha256_path

    folder = tmp_path / "model.mlpackage"
    (folder / "Data" / "weights").mkdir(parents=True)
    (folder / "Manifest.json").write_bytes(b"{}")
    cache = DigestCache(tmp_path / "state" / "d.sqlite")
    assert cache.listing(folder) == [["Data/weights/", "dir", 0], ["Manifest.json", sha256_file(folder / "Manifest.json"), 2]]
    with_it = cache.digest(folder)
    assert with_it == sha256_path(folder)
    keys.remember_listing(tmp_path, folder, keys.listing(tmp_path, folder))  # no digest remembered for a folder
    (folder / "Data" / "weights").rmdir()
    assert cache.listing(folder)[0] == ["Data/", "dir", 0]  # now Data/ is the empty one
    (folder / "Data").rmdir()
    assert cache.listing(folder) == [["Manifest.json", sha256_file(folder / "Manifest.json"), 2]]
    assert cache.digest(folder) == sha256_path(folder) != with_it
