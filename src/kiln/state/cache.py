"""The local content-addressed cache: every successful step's outputs, stored by step key.

    .kiln/cache/objects/<sha256[:2]>/<sha256>   file contents, by digest (one copy however many steps made them)
    .kiln/cache/keys/<key[:2]>/<key>.json        a step key -> its outputs (role, name, sha256, bytes) and facts

A folder output (model.mlpackage) is stored file by file: its entry also lists "files" ([relative
path, sha256, bytes] each, as the step record does), every file is an object of its own, and its
"sha256" is the tree digest (kiln.base.hashing.tree_sha256), re-checked on restore. Its empty folders
are entries of the listing too ([relative path + "/", EMPTY_FOLDER, 0], no object): a restore makes them.

A step whose key has an entry is restored instead of run: switching a manifest back to an earlier
configuration, checking out an older branch or wiping build/ brings the outputs back in the time it
takes to copy them (ccache / Bazel's disk cache / DVC's run-cache). The cache lives beside build/,
not in it, so `rm -rf build` keeps it; KILN_CACHE_DIR moves it (e.g. one cache for several clones),
KILN_CACHE=off turns it off. Objects are hard links to the files the step wrote when the filesystem
allows (no second copy on disk) and copies otherwise; a restore re-hashes what it copies, so an
object changed behind kiln's back is dropped, never restored. `kiln cache gc --max-size` keeps it
bounded, least recently used first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kiln.base.env import switched_off
from kiln.base.fsio import remove_artifact, replace_artifact, write_bytes_atomic
from kiln.base.hashing import EMPTY_FOLDER, copy_hashing, is_empty_folder, tree_sha256
from kiln.base.temps import sweep_stale_temps, temp_path


def cache_dir(root: Path) -> Path | None:
    if switched_off("KILN_CACHE"):
        return None
    return Path(os.environ.get("KILN_CACHE_DIR") or Path(root) / ".kiln" / "cache")


class ActionCache(Protocol):
    """Step key -> entry (outputs: role -> name, sha256, bytes[, files]; info), like Bazel's action
    cache. Cache (local) and kiln.state.remote_cache.RemoteCache (a shared server) both are one."""

    def get_entry(self, key: str) -> Any | None: ...

    def put_entry(self, key: str, entry: dict[str, Any]) -> None: ...


class ContentStore(Protocol):
    """sha256 -> bytes, like Bazel's CAS: where the objects an entry names are kept."""

    def has_object(self, sha256: str, size: int) -> bool: ...


@dataclass(frozen=True)
class Cache:
    folder: Path

    @classmethod
    def for_root(cls, root: Path) -> "Cache | None":
        folder = cache_dir(root)
        return cls(folder) if folder is not None else None

    def entry_path(self, key: str) -> Path:
        return self.folder / "keys" / key[:2] / f"{key}.json"

    def object_path(self, sha256: str) -> Path:
        return self.folder / "objects" / sha256[:2] / sha256

    # ---- writing ------------------------------------------------------------------------------

    def store(self, key: str, outputs: dict[str, dict[str, Any]], root: Path, info: dict[str, Any]) -> None:
        """Remember a finished step: outputs is role -> {"path" (workspace-relative), "sha256", "bytes"}
        and, for a folder, "files" (its listing, kiln.base.digests.listing)."""
        for out in outputs.values():
            if "files" in out:
                for rel, sha256, _ in out["files"]:
                    if not is_empty_folder(rel):
                        self._store_object(root / out["path"] / rel, sha256)
            else:
                self._store_object(root / out["path"], out["sha256"])
        entry = {"key": key, "outputs": {role: _entry_output(o) for role, o in outputs.items()}, "info": info}
        self.put_entry(key, entry)

    def put_entry(self, key: str, entry: dict[str, Any]) -> None:
        """Write a step's entry as it is (temp + rename): its objects must be stored first."""
        write_bytes_atomic(self.entry_path(key), (json.dumps(entry, sort_keys=True, indent=1) + "\n").encode())

    def adopt_object(self, sha256: str, verified: Path) -> None:
        """Move a file whose bytes were just checked to have this sha256 (a download's temp file,
        in this object's folder) into place as that object."""
        os.replace(verified, self.object_path(sha256))

    def _store_object(self, path: Path, sha256: str) -> None:
        target = self.object_path(sha256)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(target.parent)
        tmp = temp_path(target)
        try:
            os.link(path, tmp)  # same filesystem: no second copy of the bytes
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, target)

    # ---- reading ------------------------------------------------------------------------------

    def get_entry(self, key: str) -> dict[str, Any] | None:
        """A key's entry as stored, its objects not checked; None when absent or torn."""
        try:
            return json.loads(self.entry_path(key).read_text())
        except (OSError, ValueError):
            return None

    def has_object(self, sha256: str, size: int | None = None) -> bool:
        """Whether the object is stored (with `size` bytes, when given); its bytes are checked on restore."""
        try:
            found = self.object_path(sha256).stat()
        except OSError:
            return False
        return size is None or found.st_size == size

    def lookup(self, key: str) -> dict[str, Any] | None:
        """A key's entry when every object it names is stored, else None."""
        entry = self.get_entry(key)
        if entry is None or not all(self.object_path(sha256).is_file() for sha256 in entry_objects(entry)):
            return None
        return entry

    def restore(self, key: str, destinations: dict[str, Path]) -> dict[str, Any] | None:
        """Copy a cached step's outputs to their paths (temp + rename, each re-hashed on the way).
        Returns the entry, or None (and writes nothing) when the key is not cached or an object no
        longer has its digest (that entry is dropped)."""
        entry = self.lookup(key)
        if entry is None or set(entry["outputs"]) != set(destinations):
            return None
        temps = {}
        try:
            for role, out in entry["outputs"].items():
                dest = destinations[role]
                dest.parent.mkdir(parents=True, exist_ok=True)
                sweep_stale_temps(dest.parent)
                temps[role] = temp_path(dest, "restore")
                if not self._copy_out(out, temps[role]):
                    self.entry_path(key).unlink(missing_ok=True)
                    return None
            for role, tmp in temps.items():
                replace_artifact(tmp, destinations[role])
            temps = {}
        finally:
            for tmp in temps.values():
                remove_artifact(tmp)
        os.utime(self.entry_path(key))  # least recently used goes first in gc
        return entry

    def _copy_out(self, out: dict[str, Any], dest: Path) -> bool:
        """Copy one output's object(s) to dest (a file, or a folder of its files), re-hashing every
        byte. False when an object no longer has its digest (that object is dropped), or a folder
        entry's listing does not add up to its digest or names a path outside the folder."""
        if "files" not in out:
            return self._copy_object(out["sha256"], dest)
        if listing_problem(out["files"]) is not None:
            return False
        dest.mkdir()
        for rel, sha256, _ in out["files"]:
            if is_empty_folder(rel):
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            if not self._copy_object(sha256, dest / rel):
                return False
        return tree_sha256((rel, sha256) for rel, sha256, _ in out["files"]) == out["sha256"]

    def _copy_object(self, sha256: str, dest: Path) -> bool:
        if copy_hashing(self.object_path(sha256), dest) != sha256:
            self.object_path(sha256).unlink(missing_ok=True)
            return False
        return True

    # ---- keeping it bounded -------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        entries = list((self.folder / "keys").glob("*/*.json"))
        objects = self._objects()
        return {"entries": len(entries), "objects": len(objects), "bytes": sum(p.stat().st_size for p in objects)}

    def _objects(self) -> list[Path]:
        """Stored objects, without the hidden temps of writers still storing one."""
        return [p for p in (self.folder / "objects").glob("*/*") if not p.name.startswith(".")]

    def gc(self, max_bytes: int) -> dict[str, int]:
        """Drop least recently used entries until the objects they keep fit in max_bytes, then the
        objects no entry names. Returns what was removed."""
        entries = []
        for path in (self.folder / "keys").glob("*/*.json"):
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            entries.append((path.stat().st_mtime, path, entry_objects(entry)))
        entries.sort(key=lambda e: e[0], reverse=True)  # newest first: kept first
        kept: dict[str, int] = {}
        kept_bytes = removed_entries = 0
        for _, path, objects in entries:
            grown = sum(size for sha, size in objects.items() if sha not in kept)
            if kept_bytes + grown <= max_bytes:
                kept |= objects
                kept_bytes += grown
            else:
                path.unlink(missing_ok=True)
                removed_entries += 1
        freed = removed_objects = 0
        for obj in self._objects():
            if obj.name not in kept:
                freed += obj.stat().st_size
                obj.unlink(missing_ok=True)
                removed_objects += 1
        return {"entries_removed": removed_entries, "objects_removed": removed_objects, "bytes_freed": freed, "bytes_kept": kept_bytes}


def _entry_output(out: dict[str, Any]) -> dict[str, Any]:
    """An output as its cache entry keeps it: its name, sha256 and bytes (and a folder's files)."""
    kept = {"name": Path(out["path"]).name, "sha256": out["sha256"], "bytes": out["bytes"]}
    return kept | ({"files": out["files"]} if "files" in out else {})


def entry_objects(entry: dict[str, Any]) -> dict[str, int]:
    """sha256 -> bytes of every object a cache entry names (each file, or each file of a folder)."""
    return {sha256: size for out in entry["outputs"].values() for sha256, size in _objects_of(out).items()}


def _objects_of(out: dict[str, Any]) -> dict[str, int]:
    """sha256 -> bytes of the objects an entry's output is made of: the file, or each file of a folder."""
    if "files" in out:
        return {sha256: size for rel, sha256, size in out["files"] if not is_empty_folder(rel)}
    return {out["sha256"]: out["bytes"]}


def listing_problem(files: list[list[Any]]) -> str | None:
    """Why a folder entry's listing ([relative path, sha256, bytes] lines) may not be restored, or None:
    each path must be _well_formed, none twice, and none inside a path listed as a file or as an
    empty folder (a restore would fail half way, or write what no real folder holds)."""
    names = set()
    for rel, sha256, _ in files:
        if not _well_formed(rel, sha256) or "\0" in rel:
            return f"its path {rel!r} is not one inside the folder"
        name = rel.rstrip("/")
        if name in names:
            return f"it lists {name!r} twice"
        names.add(name)
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in names:
                return f"it lists {name!r} inside {'/'.join(parts[:i])!r}, which it lists as a file or an empty folder"
    return None


def _well_formed(rel: str, sha256: str) -> bool:
    """Whether a folder entry's listing line may be restored: a path inside the folder, and an empty
    folder (a path ending in "/") exactly when its digest is EMPTY_FOLDER."""
    if is_empty_folder(rel):
        return sha256 == EMPTY_FOLDER and _inside(rel[:-1])
    return sha256 != EMPTY_FOLDER and _inside(rel)


def _inside(rel: str) -> bool:
    """Whether a folder entry's relative path stays inside the folder (an edited entry must not
    make a restore write elsewhere)."""
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and ".." not in parts and "" not in parts and "." not in parts


def parse_size(text: str) -> int:
    """'500M', '2G', '1.5GiB', '4096' -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned and cleaned[-1] in units else (cleaned, "")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size; expected e.g. 500M, 2G or a number of bytes") from None
    if not math.isfinite(value * units[unit]):
        raise ValueError(f"{text!r} is not a size; expected a finite number, e.g. 500M or 2G")
    if value < 0:
        raise ValueError(f"{text!r} is not a size; it must not be negative")
    return int(value * units[unit])
