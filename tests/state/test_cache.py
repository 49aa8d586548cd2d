"""kiln.state.cache: the local content-addressed cache of step outputs. Storing and restoring a step's
outputs by key (same bytes, same facts), restores that write nothing (unknown key, other roles, a
corrupted object, which is also dropped), folder outputs (stored file by file, restored whole, never
from a corrupted file, an entry naming a path outside the folder or a listing that does not add up),
stats, gc within a byte limit, parse_size for
`kiln cache gc --max-size`, and where the cache lives (KILN_CACHE=off, KILN_CACHE_DIR)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from kiln.base.hashing import tree_sha256
from kiln.state.cache import Cache, cache_dir, parse_size

KEY_1, KEY_2, KEY_3 = "1" * 64, "2" * 64, "3" * 64


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_output(root: Path, rel: str, data: bytes) -> dict:
    """A step output in the workspace, described as a record's outputs entry."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"path": rel, "sha256": sha256(data), "bytes": len(data)}


def stored(cache: Cache, root: Path, key: str, files: dict[str, bytes], info: dict | None = None) -> dict[str, dict]:
    """Write `files` (role -> bytes) as a step's outputs under build/.steps/<key>/ and store them."""
    outputs = {role: write_output(root, f"build/.steps/{key[:8]}/{role}.bin", data) for role, data in files.items()}
    cache.store(key, outputs, root, info or {})
    return outputs


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")


# ---- store and restore ---------------------------------------------------------------------------------

def test_a_restore_brings_back_the_same_bytes_and_the_steps_facts(tmp_path: Path, cache: Cache):
    stored(cache, tmp_path / "ws", KEY_1, {"model": b"onnx bytes", "weights": b"\x00\x01\x02"}, {"nodes": 12})
    clean = tmp_path / "clean"  # e.g. after rm -rf build
    dest = {"model": clean / "out" / "model.onnx", "weights": clean / "out" / "model.bin"}
    entry = cache.restore(KEY_1, dest)
    assert entry is not None and entry["info"] == {"nodes": 12}
    assert dest["model"].read_bytes() == b"onnx bytes" and dest["weights"].read_bytes() == b"\x00\x01\x02"
    assert entry["outputs"]["model"] == {"name": "model.bin", "sha256": sha256(b"onnx bytes"), "bytes": 10}


def test_a_restore_replaces_what_is_at_the_destination(tmp_path: Path, cache: Cache):
    stored(cache, tmp_path / "ws", KEY_1, {"model": b"cached"})
    dest = tmp_path / "out" / "model.onnx"
    dest.parent.mkdir()
    dest.write_bytes(b"stale output of another configuration")
    assert cache.restore(KEY_1, {"model": dest}) is not None
    assert dest.read_bytes() == b"cached"
    assert [p.name for p in dest.parent.iterdir()] == ["model.onnx"]  # no temp left behind


def test_the_stored_object_survives_the_build_folder(tmp_path: Path, cache: Cache):
    outputs = stored(cache, tmp_path / "ws", KEY_1, {"model": b"onnx bytes"})
    (tmp_path / "ws" / outputs["model"]["path"]).unlink()
    assert cache.restore(KEY_1, {"model": tmp_path / "again.onnx"}) is not None
    assert (tmp_path / "again.onnx").read_bytes() == b"onnx bytes"


def test_an_unknown_key_restores_nothing(tmp_path: Path, cache: Cache):
    stored(cache, tmp_path / "ws", KEY_1, {"model": b"onnx bytes"})
    dest = tmp_path / "out" / "model.onnx"
    assert cache.restore(KEY_2, {"model": dest}) is None
    assert not dest.parent.exists()


def test_an_empty_cache_restores_nothing(tmp_path: Path, cache: Cache):
    assert cache.lookup(KEY_1) is None
    assert cache.restore(KEY_1, {"model": tmp_path / "out" / "model.onnx"}) is None
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("roles", [("model",), ("model", "weights", "extra"), ("artifact", "weights")])
def test_destinations_with_other_roles_restore_nothing(tmp_path: Path, cache: Cache, roles: tuple[str, ...]):
    stored(cache, tmp_path / "ws", KEY_1, {"model": b"onnx bytes", "weights": b"weights"})
    out = tmp_path / "out"
    assert cache.restore(KEY_1, {role: out / f"{role}.bin" for role in roles}) is None
    assert files_under(out) == []
    assert cache.lookup(KEY_1) is not None  # the entry itself is fine


def test_an_entry_whose_object_is_gone_is_not_found(tmp_path: Path, cache: Cache):
    outputs = stored(cache, tmp_path / "ws", KEY_1, {"model": b"onnx bytes"})
    cache.object_path(outputs["model"]["sha256"]).unlink()
    assert cache.lookup(KEY_1) is None
    assert cache.restore(KEY_1, {"model": tmp_path / "out" / "model.onnx"}) is None


def test_a_corrupted_object_is_never_restored_and_its_entry_is_dropped(tmp_path: Path, cache: Cache):
    outputs = stored(cache, tmp_path / "ws", KEY_1, {"model": b"onnx bytes", "weights": b"weights"})
    obj = cache.object_path(outputs["weights"]["sha256"])
    obj.unlink()  # break the hard link to the build's own file first
    obj.write_bytes(b"weightz")  # same size, other bytes
    out = tmp_path / "out"
    dest = {"model": out / "model.onnx", "weights": out / "model.bin"}
    assert cache.restore(KEY_1, dest) is None
    assert files_under(out) == []  # not even the intact file: all or nothing
    assert not cache.entry_path(KEY_1).exists() and not obj.exists()
    assert cache.restore(KEY_1, dest) is None


def test_a_corrupted_entry_file_is_not_found(tmp_path: Path, cache: Cache):
    stored(cache, tmp_path / "ws", KEY_1, {"model": b"onnx bytes"})
    cache.entry_path(KEY_1).write_text('{"key": "1111')
    assert cache.lookup(KEY_1) is None
    assert cache.restore(KEY_1, {"model": tmp_path / "out.onnx"}) is None


def test_two_steps_with_the_same_output_bytes_share_one_object(tmp_path: Path, cache: Cache):
    stored(cache, tmp_path / "ws", KEY_1, {"model": b"same bytes"})
    stored(cache, tmp_path / "ws", KEY_2, {"model": b"same bytes"})
    assert cache.stats() == {"entries": 2, "objects": 1, "bytes": 10}
    assert cache.restore(KEY_2, {"model": tmp_path / "b.onnx"}) is not None and (tmp_path / "b.onnx").read_bytes() == b"same bytes"


def test_storing_a_key_again_keeps_one_entry(tmp_path: Path, cache: Cache):
    stored(cache, tmp_path / "ws", KEY_1, {"model": b"first"}, {"run": 1})
    stored(cache, tmp_path / "ws", KEY_1, {"model": b"first"}, {"run": 2})
    assert cache.stats()["entries"] == 1
    assert cache.lookup(KEY_1)["info"] == {"run": 2}


# ---- stats and gc --------------------------------------------------------------------------------------

def test_stats_count_entries_objects_and_bytes(tmp_path: Path, cache: Cache):
    assert cache.stats() == {"entries": 0, "objects": 0, "bytes": 0}
    stored(cache, tmp_path / "ws", KEY_1, {"model": b"x" * 100, "weights": b"y" * 50})
    stored(cache, tmp_path / "ws", KEY_2, {"model": b"z" * 30})
    assert cache.stats() == {"entries": 2, "objects": 3, "bytes": 180}


def test_stats_and_gc_leave_a_writers_temp_alone(tmp_path: Path, cache: Cache):
    outputs = stored(cache, tmp_path / "ws", KEY_1, {"model": b"x" * 100})
    folder = cache.object_path(outputs["model"]["sha256"]).parent
    temp = folder / f".{'f' * 64}.kiln-{os.getpid()}-1.tmp"  # another step of this build, storing right now
    temp.write_bytes(b"in flight")
    assert cache.stats() == {"entries": 1, "objects": 1, "bytes": 100}
    cache.gc(0)
    assert temp.exists()


def test_gc_keeps_an_object_shared_by_two_entries_once(tmp_path: Path, cache: Cache):
    stored(cache, tmp_path / "ws", KEY_1, {"model": b"s" * 100})
    stored(cache, tmp_path / "ws", KEY_2, {"model": b"s" * 100, "weights": b"w" * 50})
    done = cache.gc(150)  # 100 shared + 50: both entries fit, the shared object counts once
    assert done == {"entries_removed": 0, "objects_removed": 0, "bytes_freed": 0, "bytes_kept": 150}
    assert cache.lookup(KEY_1) is not None and cache.lookup(KEY_2) is not None


def test_gc_drops_objects_only_an_evicted_entry_named(tmp_path: Path, cache: Cache):
    stored(cache, tmp_path / "ws", KEY_1, {"model": b"s" * 100, "weights": b"w" * 50})
    stored(cache, tmp_path / "ws", KEY_2, {"model": b"s" * 100})
    os.utime(cache.entry_path(KEY_1), (1000, 1000))  # KEY_2 was used last
    done = cache.gc(120)
    assert done == {"entries_removed": 1, "objects_removed": 1, "bytes_freed": 50, "bytes_kept": 100}
    assert cache.lookup(KEY_1) is None and cache.lookup(KEY_2) is not None
    assert cache.stats() == {"entries": 1, "objects": 1, "bytes": 100}


def test_a_restore_counts_as_a_use(tmp_path: Path, cache: Cache):
    stored(cache, tmp_path / "ws", KEY_1, {"model": b"a" * 100})
    stored(cache, tmp_path / "ws", KEY_2, {"model": b"b" * 100})
    os.utime(cache.entry_path(KEY_1), (1000, 1000))
    os.utime(cache.entry_path(KEY_2), (2000, 2000))
    cache.restore(KEY_1, {"model": tmp_path / "out.bin"})  # KEY_1 is now the most recently used
    cache.gc(100)
    assert cache.lookup(KEY_1) is not None and cache.lookup(KEY_2) is None


def test_gc_to_zero_empties_the_cache(tmp_path: Path, cache: Cache):
    stored(cache, tmp_path / "ws", KEY_1, {"model": b"a" * 100})
    stored(cache, tmp_path / "ws", KEY_2, {"model": b"b" * 200, "weights": b"a" * 100})
    done = cache.gc(0)
    assert done == {"entries_removed": 2, "objects_removed": 2, "bytes_freed": 300, "bytes_kept": 0}
    assert cache.stats() == {"entries": 0, "objects": 0, "bytes": 0}
    assert cache.restore(KEY_1, {"model": tmp_path / "out.bin"}) is None


def test_gc_keeps_the_build_outputs_the_objects_were_linked_to(tmp_path: Path, cache: Cache):
    outputs = stored(cache, tmp_path / "ws", KEY_1, {"model": b"a" * 100})
    cache.gc(0)
    assert (tmp_path / "ws" / outputs["model"]["path"]).read_bytes() == b"a" * 100


def test_gc_drops_unreadable_entries_and_the_objects_nobody_names(tmp_path: Path, cache: Cache):
    stored(cache, tmp_path / "ws", KEY_1, {"model": b"a" * 100})
    stored(cache, tmp_path / "ws", KEY_2, {"model": b"b" * 100})
    cache.entry_path(KEY_2).write_text("{torn")
    done = cache.gc(10**9)
    assert done["objects_removed"] == 1 and done["bytes_kept"] == 100
    assert cache.stats() == {"entries": 1, "objects": 1, "bytes": 100}


def test_gc_of_an_empty_or_missing_cache_does_nothing(tmp_path: Path):
    done = Cache(tmp_path / "nowhere").gc(0)
    assert done == {"entries_removed": 0, "objects_removed": 0, "bytes_freed": 0, "bytes_kept": 0}


# ---- folder outputs (model.mlpackage, a SavedModel) -------------------------------------------------

PACKAGE = {"Manifest.json": b"{}", "Data/com.apple.CoreML/model.mlmodel": b"spec", "Data/com.apple.CoreML/weights/weight.bin": b"w" * 50}


def stored_folder(cache: Cache, root: Path, key: str, files: dict[str, bytes] = PACKAGE) -> dict:
    """A folder output under build/.steps/, described as the step runner records it, and stored."""
    rel = f"build/.steps/{key[:8]}/model.mlpackage"
    for name, data in files.items():
        (root / rel / name).parent.mkdir(parents=True, exist_ok=True)
        (root / rel / name).write_bytes(data)
    listing = [[name, sha256(data), len(data)] for name, data in sorted(files.items())]
    out = {"path": rel, "sha256": tree_sha256((name, digest) for name, digest, _ in listing), "bytes": sum(len(d) for d in files.values()), "files": listing}
    cache.store(key, {"model": out}, root, {})
    return out


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files_under(folder)}


def test_a_folder_is_stored_file_by_file_and_restored_whole(tmp_path: Path, cache: Cache):
    out = stored_folder(cache, tmp_path / "ws", KEY_1)
    built = tmp_path / "ws" / out["path"]
    assert all(os.path.samefile(built / name, cache.object_path(sha256(data))) for name, data in PACKAGE.items())  # hard links
    dest = tmp_path / "clean" / "model.mlpackage"
    _write_tree(dest, {"stale.bin": b"old configuration"})
    entry = cache.restore(KEY_1, {"model": dest})
    assert entry is not None and entry["outputs"]["model"] == {"name": "model.mlpackage", "sha256": out["sha256"], "bytes": 56, "files": out["files"]}
    assert tree(dest) == PACKAGE  # whole: the stale file went with the folder it replaced
    assert [p.name for p in dest.parent.iterdir()] == ["model.mlpackage"]
    assert cache.stats() == {"entries": 1, "objects": 3, "bytes": 56}


def test_a_corrupted_file_of_a_folder_is_never_restored(tmp_path: Path, cache: Cache):
    stored_folder(cache, tmp_path / "ws", KEY_1)
    obj = cache.object_path(sha256(PACKAGE["Manifest.json"]))
    obj.unlink()  # break the link first: the object alone is changed
    obj.write_bytes(b"{\"x\"}")
    dest = _write_tree(tmp_path / "out" / "model.mlpackage", {"Manifest.json": b"previous"})
    assert cache.restore(KEY_1, {"model": dest}) is None
    assert tree(dest) == {"Manifest.json": b"previous"} and [p.name for p in dest.parent.iterdir()] == ["model.mlpackage"]
    assert not obj.exists() and not cache.entry_path(KEY_1).exists()


@pytest.mark.parametrize("rel", ["../escaped", "/abs/path", "a/../../b", ""])
def test_a_folder_entry_naming_a_path_outside_the_folder_restores_nothing(tmp_path: Path, cache: Cache, rel: str):
    import json

    stored_folder(cache, tmp_path / "ws", KEY_1)
    entry = json.loads(cache.entry_path(KEY_1).read_text())
    entry["outputs"]["model"]["files"][0][0] = rel
    cache.entry_path(KEY_1).write_text(json.dumps(entry))
    assert cache.restore(KEY_1, {"model": tmp_path / "out" / "model.mlpackage"}) is None
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out" / "model.mlpackage").exists()


def test_a_folder_entry_whose_listing_does_not_add_up_to_its_digest_restores_nothing(tmp_path: Path, cache: Cache):
    import json

    stored_folder(cache, tmp_path / "ws", KEY_1)
    entry = json.loads(cache.entry_path(KEY_1).read_text())
    del entry["outputs"]["model"]["files"][0]  # a file left out of an edited entry
    cache.entry_path(KEY_1).write_text(json.dumps(entry))
    assert cache.restore(KEY_1, {"model": tmp_path / "out" / "model.mlpackage"}) is None
    assert not (tmp_path / "out" / "model.mlpackage").exists()


def test_gc_keeps_a_kept_folders_file_objects_and_drops_an_evicted_ones(tmp_path: Path, cache: Cache):
    stored_folder(cache, tmp_path / "ws", KEY_1, {"a.bin": b"a" * 100, "b.bin": b"b" * 100})
    os.utime(cache.entry_path(KEY_1), (1, 1))  # the older entry
    stored_folder(cache, tmp_path / "ws", KEY_2, {"c.bin": b"c" * 100})
    done = cache.gc(150)
    assert done["entries_removed"] == 1 and done["bytes_kept"] == 100
    assert cache.restore(KEY_2, {"model": tmp_path / "out" / "m"}) is not None and tree(tmp_path / "out" / "m") == {"c.bin": b"c" * 100}
    assert cache.stats() == {"entries": 1, "objects": 1, "bytes": 100}


def test_an_entry_missing_one_file_object_of_a_folder_is_not_found(tmp_path: Path, cache: Cache):
    stored_folder(cache, tmp_path / "ws", KEY_1)
    cache.object_path(sha256(PACKAGE["Manifest.json"])).unlink()
    assert cache.lookup(KEY_1) is None


def _write_tree(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


# ---- parse_size --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096),
    ("0", 0),
    ("500M", 500 << 20),
    ("500m", 500 << 20),
    ("500MB", 500 << 20),
    ("2G", 2 << 30),
    (" 2G ", 2 << 30),
    ("1.5GiB", 3 << 29),
    ("64K", 64 << 10),
    ("1T", 1 << 40),
    ("100B", 100),
])
def test_parse_size_reads_sizes_people_write(text: str, expected: int):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "", "M", "GiB", "5X", "1.2.3G", "--max-size"])
def test_parse_size_refuses_junk(text: str):
    with pytest.raises(ValueError, match="is not a size; expected e.g. 500M"):
        parse_size(text)


@pytest.mark.parametrize("text", ["-1", "-5G", "-0.5M"])
def test_parse_size_refuses_negative_sizes(text: str):
    with pytest.raises(ValueError, match="must not be negative"):
        parse_size(text)


@pytest.mark.parametrize("text", ["inf", "1e400G"])
def test_parse_size_refuses_infinite_sizes_as_a_usage_error(text: str):
    with pytest.raises(ValueError):
        parse_size(text)


# ---- where it lives ----------------------------------------------------------------------------------

def test_the_cache_lives_beside_build_by_default(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("KILN_CACHE", raising=False)
    monkeypatch.delenv("KILN_CACHE_DIR", raising=False)
    assert cache_dir(tmp_path) == tmp_path / ".kiln" / "cache"
    assert Cache.for_root(tmp_path) == Cache(tmp_path / ".kiln" / "cache")


@pytest.mark.parametrize("value", ["off", "OFF", "0", "false", "no"])
def test_kiln_cache_off_turns_it_off(tmp_path: Path, monkeypatch, value: str):
    monkeypatch.setenv("KILN_CACHE", value)
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "shared"))
    assert cache_dir(tmp_path) is None
    assert Cache.for_root(tmp_path) is None


def test_kiln_cache_dir_moves_it(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("KILN_CACHE", raising=False)
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "shared"))
    assert cache_dir(tmp_path / "clone1") == cache_dir(tmp_path / "clone2") == tmp_path / "shared"


def test_an_empty_kiln_cache_dir_means_the_default(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", "on")
    monkeypatch.setenv("KILN_CACHE_DIR", "")
    assert cache_dir(tmp_path) == tmp_path / ".kiln" / "cache"


def test_gc_drops_least_recently_used_first(tmp_path: Path):
    from kiln.state.cache import Cache

    cache = Cache(tmp_path / "cache")
    for index, size in enumerate((100, 200, 300)):
        out = tmp_path / f"out{index}"
        out.write_bytes(bytes([index]) * size)
        cache.store(f"{index:064d}", {"model": {"path": out.name, "sha256": sha256(out.read_bytes()), "bytes": size}}, tmp_path, {})
        os.utime(cache.entry_path(f"{index:064d}"), (1000 + index, 1000 + index))
    os.utime(cache.entry_path(f"{0:064d}"), (2000, 2000))  # the first one was used last
    done = cache.gc(450)
    # newest first: entry 0 (100 B, used last) and entry 2 (300 B) fit in 450; entry 1 (200 B) would not
    assert done["entries_removed"] == 1 and done["objects_removed"] == 1 and done["bytes_kept"] == 400
    assert cache.lookup(f"{0:064d}") is not None and cache.lookup(f"{2:064d}") is not None and cache.lookup(f"{1:064d}") is None


def test_a_folders_empty_folders_are_stored_in_its_entry_and_made_again_on_restore(tmp_path: Path, cache: Cache):
    """A Core ML package's empty weights/ folder (named by its Manifest.json) and a SavedModel's empty
    assets/ come back from the cache: without them the restored artifact does not load."""
    from kiln.base.digests import listing

    root = tmp_path / "ws"
    built = root / "build/.steps/k/model.mlpackage"
    _write_tree(built, {"Manifest.json": b"{}"})
    (built / "Data" / "com.apple.CoreML" / "weights").mkdir(parents=True)
    (built / "assets").mkdir()
    files = listing(root, built)
    out = {"path": "build/.steps/k/model.mlpackage", "sha256": tree_sha256((r, s) for r, s, _ in files), "bytes": 2, "files": files}
    cache.store(KEY_1, {"model": out}, root, {})
    assert cache.stats() == {"entries": 1, "objects": 1, "bytes": 2}  # no object for an empty folder
    dest = tmp_path / "clean" / "model.mlpackage"
    assert cache.restore(KEY_1, {"model": dest}) is not None
    assert (dest / "Data" / "com.apple.CoreML" / "weights").is_dir() and (dest / "assets").is_dir()
    assert tree(dest) == {"Manifest.json": b"{}"} and listing(root, dest) == files


@pytest.mark.parametrize(("rel", "digest"), [("../escaped/", "dir"), ("assets/", "0" * 64), ("assets", "dir"), ("/abs/", "dir")])
def test_a_folder_entry_with_a_malformed_empty_folder_restores_nothing(tmp_path: Path, cache: Cache, rel: str, digest: str):
    import json

    stored_folder(cache, tmp_path / "ws", KEY_1)
    entry = json.loads(cache.entry_path(KEY_1).read_text())
    entry["outputs"]["model"]["files"].append([rel, digest, 0])
    cache.entry_path(KEY_1).write_text(json.dumps(entry))
    assert cache.restore(KEY_1, {"model": tmp_path / "out" / "model.mlpackage"}) is None
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out" / "model.mlpackage").exists()
