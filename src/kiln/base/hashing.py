"""Pure hashing: canonical JSON, sha256 of text, files (also while copying one) and folders, BLAKE3
of files.

sha256 is the one digest in keys, lockfiles, the cache and provenance. BLAKE3 is only the quick
"same bytes as before?" re-check of a touched file (kiln.base.digests).

A step output or published artifact may be a folder (Core ML's model.mlpackage, a TensorFlow
SavedModel). Its digest is tree_sha256 of its listing (list_tree), defined there.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Iterable

CHUNK = 1 << 20


def canonical_json(obj: Any) -> str:
    """One text per value: sorted keys, no spaces, floats in repr form."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    return _stream(path, None)


def sha256_path(path: Path) -> str:
    """sha256 of a file, or tree_sha256 of a folder, every byte read (no digest cache: kiln verify)."""
    if os.path.isdir(path) and not os.path.islink(path):
        return tree_sha256((rel, sha256_file(file)) for rel, file in list_tree(path))
    return sha256_file(path)


class UnsafeFolderEntry(OSError):
    """A folder artifact holds something other than regular files and folders: a symlink (the
    artifact would point outside itself, and its bytes would depend on what the link reaches) or a
    fifo, socket or device. `relpath` names it inside the folder."""

    def __init__(self, folder: Path | str, relpath: str, kind: str):
        self.folder, self.relpath, self.kind = os.fspath(folder), relpath, kind
        super().__init__(self.naming(self.folder))

    def naming(self, folder: str) -> str:
        """The message, with the folder named as the reader knows it (e.g. workspace-relative)."""
        return f"{folder}/{self.relpath} is a {self.kind}; a folder artifact may hold only regular files and folders"


def list_tree(folder: Path | str) -> list[tuple[str, str]]:
    """(relative POSIX path, absolute path) of every regular file under `folder`, in tree_sha256's
    order. Empty folders are not listed (they hold no bytes). Raises UnsafeFolderEntry on a symlink
    (to a file or a folder) or any entry that is neither a regular file nor a folder."""
    found: list[tuple[str, str]] = []
    pending = [(os.fspath(folder), "")]
    while pending:
        where, prefix = pending.pop()
        with os.scandir(where) as entries:
            for entry in entries:
                rel = prefix + entry.name
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISREG(mode):
                    found.append((rel, entry.path))
                elif stat.S_ISDIR(mode):
                    pending.append((entry.path, rel + "/"))
                elif stat.S_ISLNK(mode):
                    raise UnsafeFolderEntry(folder, rel, f"symbolic link (to {os.readlink(entry.path)})")
                else:
                    raise UnsafeFolderEntry(folder, rel, _special_kind(mode))
    return sorted(found, key=lambda item: _listing_name(item[0]))


def tree_sha256(files: Iterable[tuple[str, str]]) -> str:
    r"""The digest of a folder, given (relative POSIX path, sha256 of the file) for each regular file:

        sha256( for each file, sorted by the UTF-8 bytes of its relative path:
                relpath + "\0" + file_sha256 + "\n" )

    so it depends on the files' paths inside the folder and their bytes only: not on mtimes,
    permissions, the order the filesystem lists them in, where the folder is, or empty folders.
    An empty folder's digest is sha256 of nothing."""
    digest = hashlib.sha256()
    for rel, sha256 in sorted(files, key=lambda item: _listing_name(item[0])):
        digest.update(_listing_name(rel) + b"\0" + sha256.encode("ascii") + b"\n")
    return digest.hexdigest()


def _listing_name(rel: str) -> bytes:
    """A relative path as the bytes the filesystem holds (a name that is not UTF-8 keeps its bytes)."""
    return rel.encode("utf-8", "surrogateescape")


def _special_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "special file"


def copy_hashing(source: Path, dest: Path) -> str:
    """Copy source to dest and return the sha256 of the bytes copied (one read for both)."""
    with open(dest, "wb") as out:
        return _stream(source, out)


def _stream(path: Path, out) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
    return digest.hexdigest()


_THREADED_PID: list[int] = []  # the process whose BLAKE3 thread pool exists, once one does


def _blake3_threads() -> int:
    """Every core, in the process that started BLAKE3's (rayon) thread pool. A process forked after
    that (doit -n N workers) inherits the pool without its threads and would wait on it forever,
    so it hashes on one thread."""
    import blake3

    if not _THREADED_PID:
        _THREADED_PID.append(os.getpid())
    return blake3.blake3.AUTO if _THREADED_PID[0] == os.getpid() else 1


def blake3_file(path: Path) -> str:
    """BLAKE3 of a file, memory-mapped and on every core: the quick "same bytes as before?" check."""
    import blake3

    if os.path.getsize(path) == 0:  # an empty file cannot be mapped
        return blake3.blake3().hexdigest()
    return blake3.blake3(max_threads=_blake3_threads()).update_mmap(path).hexdigest()
